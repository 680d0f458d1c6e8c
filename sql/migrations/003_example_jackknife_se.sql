-- Standard errors from resampling over examples: ap_overall_se is now the example
-- jackknife SE; these columns hold the pair-only part, the 95% interval, its degrees of freedom and
-- the number of examples. The new table head_bucket_summary comes from schema.sql.
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS ap_overall_se_pairs DOUBLE;
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS ap_overall_ci_low DOUBLE;
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS ap_overall_ci_high DOUBLE;
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS ap_se_df INTEGER;
ALTER TABLE head_metrics ADD COLUMN IF NOT EXISTS n_examples INTEGER;
