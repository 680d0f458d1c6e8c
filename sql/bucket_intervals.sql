-- Stored 95% intervals of the bucket plasticity AP_j of one run's heads (head_bucket_summary, example
-- jackknife), with the head's degrees of freedom; no rows for a run made before they were stored.
SELECT s.layer, s.q_head, s.k_head, s.q_bucket, s.ap, s.ap_se, s.ap_ci_low, s.ap_ci_high, h.ap_se_df
FROM head_bucket_summary AS s
JOIN head_metrics AS h USING (model, run_id, layer, q_head)
WHERE s.model = $m AND s.run_id = $r
ORDER BY s.layer, s.q_head, s.q_bucket
