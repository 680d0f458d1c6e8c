-- Warehouse schema. Every result table is keyed by (model, run_id); writes per
-- head are delete-then-insert inside one transaction, so re-runs replace rows.
CREATE TABLE IF NOT EXISTS shards (
    model VARCHAR NOT NULL,
    revision VARCHAR,
    layer INTEGER NOT NULL,
    head INTEGER NOT NULL,
    kind VARCHAR NOT NULL,              -- 'q' or 'k'
    path VARCHAR NOT NULL,
    n_rows BIGINT,
    dim INTEGER,
    sliding_window INTEGER,
    n_examples BIGINT,
    n_buckets INTEGER,
    min_bucket INTEGER,
    max_bucket INTEGER,
    min_position DOUBLE,
    max_position DOUBLE,
    has_token_str BOOLEAN,
    error VARCHAR,                      -- NULL when the shard passed validation
    problem VARCHAR                     -- the error's category (head_errors.problem), NULL when none
);
CREATE TABLE IF NOT EXISTS shard_buckets (
    model VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    head INTEGER NOT NULL,
    kind VARCHAR NOT NULL,
    bucket INTEGER NOT NULL,
    n_rows BIGINT,
    min_position DOUBLE,
    max_position DOUBLE,
    mean_position DOUBLE
);
-- What was resolved for each analysed model (latest state; replaced with its shard catalog).
CREATE TABLE IF NOT EXISTS models (
    model VARCHAR NOT NULL,
    dataset_name VARCHAR,
    revision VARCHAR,
    num_layers INTEGER,
    num_q_heads INTEGER,
    num_k_heads INTEGER,
    layout_source VARCHAR,              -- config | card | shards
    head_sampling VARCHAR,              -- the card's head_sampling_strategy; NULL: every head was captured
    attention_scope VARCHAR,
    bucket_scheme VARCHAR,              -- uniform | log | NULL (unknown)
    bucket_size INTEGER,
    sampling_strategy VARCHAR,          -- all | uniform | log
    sampler_base_rate DOUBLE,
    q_capture_probability DOUBLE,
    k_capture_probability DOUBLE,
    card_model_name VARCHAR,            -- untrusted text from the card
    updated_at TIMESTAMP,
    family VARCHAR,                     -- family of checkpoints (config, or the Hub branch's family_pattern)
    stage VARCHAR,                      -- training stage within the family, NULL when not given
    step BIGINT                         -- training step of the checkpoint, NULL without a family
);
-- Problems of a model's dataset that belong to no head (replaced with its shard catalog).
CREATE TABLE IF NOT EXISTS catalog_problems (
    model VARCHAR NOT NULL,
    revision VARCHAR,
    file VARCHAR,
    problem VARCHAR,
    message VARCHAR,
    recorded_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    dataset_name VARCHAR,
    revision VARCHAR,
    config_json VARCHAR,
    package_version VARCHAR,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    status VARCHAR,                     -- running | succeeded | partial | failed | interrupted
    n_heads INTEGER,
    n_done INTEGER,
    n_errors INTEGER,
    error VARCHAR                       -- why the run stopped early (failed/interrupted); NULL otherwise
);
CREATE TABLE IF NOT EXISTS head_metrics (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    n_q_tokens BIGINT,
    n_k_tokens BIGINT,
    d_model INTEGER,
    q_R2_pos DOUBLE,
    q_beta_norm DOUBLE,
    q_R2_scalar DOUBLE,
    q_mae_baseline DOUBLE,
    q_mae_proj DOUBLE,
    q_mae_ratio DOUBLE,
    q_resid0_skew DOUBLE,
    q_resid0_kurt DOUBLE,
    q_resid0_ks_p DOUBLE,
    q_noise_med_abs_skew DOUBLE,
    q_noise_med_abs_kurt DOUBLE,
    q_noise_med_ks_p DOUBLE,
    q_noise_frac_ks_p_lt_alpha DOUBLE,
    ap_overall DOUBLE,
    ap_overall_se DOUBLE,               -- example-jackknife standard error (docs/method.md#attention-plasticity)
    estimator VARCHAR,
    ap_overall_se_pairs DOUBLE,         -- pair-sampling part only (the former ap_overall_se)
    ap_overall_ci_low DOUBLE,           -- 95% t-interval of ap_overall, clipped to [0, 1]
    ap_overall_ci_high DOUBLE,
    ap_se_df INTEGER,                   -- degrees of freedom of the SEs: example groups - 1
    n_examples INTEGER,                 -- examples among the head's analysed rows
    ap_ci_calibrated BOOLEAN            -- the interval is in the regime where its coverage was checked
);
CREATE TABLE IF NOT EXISTS head_bucket_plasticity (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    q_bucket INTEGER NOT NULL,
    k_bucket INTEGER NOT NULL,
    plasticity DOUBLE,
    n_pairs INTEGER
);
-- AP_j per (head, q_bucket) with its example-jackknife standard error and 95% interval.
CREATE TABLE IF NOT EXISTS head_bucket_summary (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    q_bucket INTEGER NOT NULL,
    n_queries BIGINT,
    mean_position DOUBLE,
    n_cells INTEGER,
    n_pairs BIGINT,
    ap DOUBLE,
    ap_se DOUBLE,
    ap_ci_low DOUBLE,
    ap_ci_high DOUBLE,
    ap_se_pairs DOUBLE,
    ap_ci_calibrated BOOLEAN
);
CREATE TABLE IF NOT EXISTS head_component_weights (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    component INTEGER NOT NULL,
    component_r2 DOUBLE,
    weight DOUBLE
);
CREATE TABLE IF NOT EXISTS head_errors (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER,
    file VARCHAR,
    problem VARCHAR,                    -- short category, e.g. 'missing_columns'
    message VARCHAR,
    recorded_at TIMESTAMP
);
-- Attention patterns: attention rebuilt from the captured queries and keys.
CREATE TABLE IF NOT EXISTS token_attention (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    bucket INTEGER,
    example_id INTEGER,
    position DOUBLE,
    entropy DOUBLE,                     -- nats; NaN for positions < 2
    entropy_ratio DOUBLE,               -- entropy / log(n_keys)
    max_attn DOUBLE,
    k_eff BIGINT,                       -- fewest keys holding 90% of the mass
    query_norm DOUBLE,
    n_keys BIGINT,                      -- captured keys the query may see
    n_visible BIGINT,                   -- positions the query may see
    key_coverage DOUBLE,                -- distinct captured visible positions / n_visible
    row_std DOUBLE,
    exact BOOLEAN                       -- key_coverage = 1: the model's attention, not an estimate
);
CREATE TABLE IF NOT EXISTS head_attention_summary (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    n_queries BIGINT,
    n_queries_with_keys BIGINT,
    n_examples BIGINT,
    head_dim INTEGER,
    sliding_window INTEGER,
    mean_entropy DOUBLE,
    mean_entropy_ratio DOUBLE,
    mean_max_attn DOUBLE,
    mean_k_eff DOUBLE,
    mean_query_norm DOUBLE,
    mean_n_keys DOUBLE,
    mean_key_coverage DOUBLE,
    row_std DOUBLE,
    attn_class VARCHAR,                 -- sharp | medium | uniform
    local_window INTEGER,
    local_attn_near DOUBLE,
    local_attn_far DOUBLE,
    local_bias_ratio DOUBLE,
    same_token_attn DOUBLE,
    diff_token_attn DOUBLE,
    same_token_ratio DOUBLE,
    qvar_l2_adjacent DOUBLE,
    qvar_l2_distant DOUBLE,
    qvar_pairs_adjacent BIGINT,
    qvar_pairs_distant BIGINT,
    max_row_sum_error DOUBLE,
    max_future_weight DOUBLE,
    max_window_weight DOUBLE,
    gain DOUBLE,                        -- slope of mean max_attn vs log(scale)
    gain_r2 DOUBLE,
    entropy_monotonic BOOLEAN,
    status VARCHAR,                     -- exact | partial | not_estimable | skipped
    status_reason VARCHAR,
    n_exact_rows BIGINT,                -- query rows that see every key they may attend to
    exact_row_frac DOUBLE,
    min_exact_rows INTEGER              -- fewer exact rows: not estimable from this capture
);
CREATE TABLE IF NOT EXISTS query_scale_sweep (
    model VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    q_head INTEGER NOT NULL,
    k_head INTEGER NOT NULL,
    scale DOUBLE,
    mean_entropy DOUBLE,
    mean_entropy_ratio DOUBLE,
    mean_max_attn DOUBLE,
    mean_k_eff DOUBLE,
    mean_row_std DOUBLE
);
