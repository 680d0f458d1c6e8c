-- One pass over the scalar columns of a shard: size, positions, windows, duplicates,
-- integer ranges and the bucket-position check of the input rules.
-- The vector column is not read here (its width comes from the Parquet schema).
-- {sliding_window} is the column name, or NULL::INTEGER for shards without one.
-- $scheme: 'uniform' | 'log' | NULL (unknown: no row is counted as a mismatch); $bucket_size,
-- $log_floor, $exact_below, $edge_slack: see warehouse.sources.shard_profile.bucket_mismatches, which computes
-- the same expression with numpy.
WITH rows AS (
    SELECT
        bucket, example_id, position, {sliding_window} AS sliding_window,
        bucket::DOUBLE AS b,
        position::DOUBLE AS p,
        CASE WHEN position::DOUBLE >= $exact_below THEN position::DOUBLE * $edge_slack ELSE 0.0 END AS t
    FROM read_parquet($path)
), checked AS (
    SELECT *,
        CASE $scheme
            WHEN 'uniform' THEN NOT (b * $bucket_size <= p + t AND p - t < (b + 1.0) * $bucket_size)
            WHEN 'log' THEN NOT (b >= $log_floor
                                 AND (b = $log_floor OR pow(2.0, b) <= (p + 1.0) + t)
                                 AND (p + 1.0) - t < pow(2.0, b + 1.0))
            ELSE FALSE
        END AS bucket_mismatch
    FROM rows
)
SELECT
    count(*)                                                    AS n_rows,
    count(DISTINCT example_id)                                  AS n_examples,
    count(*) - count(DISTINCT (example_id, position))           AS n_duplicate_rows,
    min(position)::DOUBLE                                       AS min_position,
    max(position)::DOUBLE                                       AS max_position,
    count(*) FILTER (WHERE position < 0)                        AS n_negative_positions,
    count(*) FILTER (WHERE NOT isfinite(position::DOUBLE))      AS n_nonfinite_positions,
    count(*) FILTER (WHERE isfinite(p) AND p <> floor(p))       AS n_fractional_positions,
    min(p) FILTER (WHERE isfinite(p) AND p <> floor(p))         AS first_fractional_position,
    count(*) FILTER (WHERE bucket IS NULL OR example_id IS NULL OR position IS NULL) AS n_null_keys,
    count(DISTINCT sliding_window)                              AS n_windows,
    count(*) FILTER (WHERE sliding_window IS NULL)              AS n_null_windows,
    min(sliding_window)                                         AS sliding_window,
    min(bucket)                                                 AS min_bucket,
    max(bucket)                                                 AS max_bucket,
    min(example_id)                                             AS min_example_id,
    max(example_id)                                             AS max_example_id,
    count(*) FILTER (WHERE bucket < 0)                          AS n_negative_buckets,
    count(*) FILTER (WHERE bucket_mismatch)                     AS n_bucket_mismatches,
    min(p) FILTER (WHERE bucket_mismatch)                       AS first_mismatch_position
FROM checked
