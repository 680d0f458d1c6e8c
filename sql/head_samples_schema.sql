-- head_samples: one row per query head the analysis plans (every shard, and every head the
-- layout expects), paired with its key head (GQA), with the sample sizes the subsample will draw. Written by the Dagster
-- `head_samples` asset (delete-then-insert per model in one transaction).
CREATE TABLE IF NOT EXISTS head_samples (
    model VARCHAR NOT NULL,
    revision VARCHAR,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    q_path VARCHAR,
    k_path VARCHAR,                     -- NULL: the key shard is missing
    q_rows BIGINT,
    k_rows BIGINT,
    q_sample_rows BIGINT,               -- least(rows, max_tokens_per_head)
    k_sample_rows BIGINT,
    q_dim INTEGER,
    k_dim INTEGER,
    q_buckets INTEGER,
    k_buckets INTEGER,
    sliding_window INTEGER,
    q_error VARCHAR,
    k_error VARCHAR,
    plan_problem VARCHAR                -- missing_query_shard | layout_mismatch | missing_key_shard | NULL
);
