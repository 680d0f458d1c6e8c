-- Attention plasticity is now debiased for the sampling noise of the query model's mean, and every
-- stored 95% interval says whether it lies in the regime where its coverage was checked against known
-- truth (enough queries per bucket and enough example groups). Rows of earlier runs keep NULL.
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS ap_ci_calibrated BOOLEAN;
ALTER TABLE head_bucket_summary ADD COLUMN IF NOT EXISTS ap_ci_calibrated BOOLEAN;
