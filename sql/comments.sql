-- One-line descriptions of the warehouse's columns, shown by DESCRIBE / duckdb_columns().
-- The texts are the 'meaning' cells of docs/metrics.md. Views are re-created by every
-- ensure_schema, so this runs after sql/views.sql.

COMMENT ON COLUMN head_metrics.ap_overall_se IS 'Standard error of ap_overall over the sampling of examples (queries, keys and pairs together): delete-a-group jackknife over example groups';
COMMENT ON COLUMN head_metrics.ap_overall_se_pairs IS 'Standard error of ap_overall from the key-pair draws only (queries and keys held fixed)';
COMMENT ON COLUMN head_metrics.ap_overall_ci_low IS 'Lower end of the 95% interval ap_overall - t(0.975, ap_se_df) ap_overall_se, clipped to [0, 1]';
COMMENT ON COLUMN head_metrics.ap_overall_ci_high IS 'Upper end of the 95% interval ap_overall + t(0.975, ap_se_df) ap_overall_se, clipped to [0, 1]';
COMMENT ON COLUMN head_metrics.ap_se_df IS 'Degrees of freedom of the jackknife standard errors: number of example groups - 1';
COMMENT ON COLUMN head_metrics.n_examples IS 'Distinct examples among the analysed query and key rows of the head';

COMMENT ON TABLE head_bucket_summary IS 'Bucket plasticity AP_j of every (head, query bucket) and run, with its example-jackknife standard error and 95% interval';
COMMENT ON COLUMN head_bucket_summary.model IS 'Model';
COMMENT ON COLUMN head_bucket_summary.run_id IS 'Run that produced the row';
COMMENT ON COLUMN head_bucket_summary.layer IS 'Layer index';
COMMENT ON COLUMN head_bucket_summary.q_head IS 'Query head index';
COMMENT ON COLUMN head_bucket_summary.k_head IS 'Key head index';
COMMENT ON COLUMN head_bucket_summary.q_bucket IS 'Query position bucket j (those with a non-NaN AP_j)';
COMMENT ON COLUMN head_bucket_summary.n_queries IS 'Queries of the bucket: n_j, its weight in ap_overall';
COMMENT ON COLUMN head_bucket_summary.mean_position IS 'Mean query position tau_j of the bucket';
COMMENT ON COLUMN head_bucket_summary.n_cells IS 'Cells of the bucket with key pairs: the cells AP_j averages';
COMMENT ON COLUMN head_bucket_summary.n_pairs IS 'Key pairs drawn over those cells';
COMMENT ON COLUMN head_bucket_summary.ap IS 'Bucket plasticity AP_j: mean of the plasticity of the cells with pairs';
COMMENT ON COLUMN head_bucket_summary.ap_se IS 'Standard error of AP_j over the sampling of examples (delete-a-group jackknife); NaN when a group holds all of the bucket';
COMMENT ON COLUMN head_bucket_summary.ap_ci_low IS 'Lower end of the 95% interval ap - t(0.975, ap_se_df) ap_se, clipped to [0, 1]';
COMMENT ON COLUMN head_bucket_summary.ap_ci_high IS 'Upper end of the 95% interval ap + t(0.975, ap_se_df) ap_se, clipped to [0, 1]';
COMMENT ON COLUMN head_bucket_summary.ap_se_pairs IS 'Standard error of AP_j from the key-pair draws only';

COMMENT ON COLUMN bucket_plasticity.ap_se IS 'Standard error of AP_j over the sampling of examples, from head_bucket_summary';
COMMENT ON COLUMN bucket_plasticity.ap_ci_low IS 'Lower end of the 95% interval of AP_j, from head_bucket_summary';
COMMENT ON COLUMN bucket_plasticity.ap_ci_high IS 'Upper end of the 95% interval of AP_j, from head_bucket_summary';
COMMENT ON COLUMN bucket_plasticity.n_queries IS 'Queries of the bucket, from head_bucket_summary';
