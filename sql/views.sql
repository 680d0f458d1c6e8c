-- Convenience views over the most recent run of every model.
CREATE OR REPLACE VIEW latest_runs AS
SELECT * FROM runs
QUALIFY row_number() OVER (PARTITION BY model ORDER BY started_at DESC, run_id) = 1;

CREATE OR REPLACE VIEW latest_head_metrics AS
SELECT m.* FROM head_metrics AS m JOIN latest_runs AS r USING (model, run_id);

CREATE OR REPLACE VIEW latest_head_bucket_plasticity AS
SELECT b.* FROM head_bucket_plasticity AS b JOIN latest_runs AS r USING (model, run_id);

CREATE OR REPLACE VIEW latest_head_bucket_summary AS
SELECT b.* FROM head_bucket_summary AS b JOIN latest_runs AS r USING (model, run_id);

CREATE OR REPLACE VIEW latest_head_component_weights AS
SELECT c.* FROM head_component_weights AS c JOIN latest_runs AS r USING (model, run_id);

-- Bucket-level plasticity AP_j per head (mean of its non-NaN cells), as attention plasticity defines it, with its
-- example-jackknife standard error and 95% interval from head_bucket_summary (NULL for buckets
-- whose cells all lack pairs, and for runs older than that table).
CREATE OR REPLACE VIEW bucket_plasticity AS
SELECT c.*, s.ap_se, s.ap_ci_low, s.ap_ci_high, s.n_queries
FROM (
    SELECT model, run_id, layer, q_head, k_head, q_bucket,
           avg(plasticity) FILTER (WHERE NOT isnan(plasticity)) AS plasticity,
           count(*) FILTER (WHERE NOT isnan(plasticity))        AS n_cells,
           sum(n_pairs)                                         AS n_pairs
    FROM head_bucket_plasticity
    GROUP BY ALL
) AS c
LEFT JOIN head_bucket_summary AS s USING (model, run_id, layer, q_head, k_head, q_bucket);

-- Cross-model comparison: mean head plasticity per layer.
CREATE OR REPLACE VIEW layer_plasticity AS
SELECT model, run_id, layer,
       avg(ap_overall)    AS mean_ap,
       median(ap_overall) AS median_ap,
       min(ap_overall)    AS min_ap,
       max(ap_overall)    AS max_ap,
       count(*)           AS n_heads
FROM head_metrics
GROUP BY ALL;
