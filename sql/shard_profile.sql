-- One pass over the scalar columns of a shard: size, positions, windows, duplicates.
-- The vector column is not read here (its width comes from the Parquet schema).
-- {sliding_window} is the column name, or NULL::INTEGER for shards without one.
SELECT
    count(*)                                                    AS n_rows,
    count(DISTINCT example_id)                                  AS n_examples,
    count(*) - count(DISTINCT (example_id, position))           AS n_duplicate_rows,
    min(position)::DOUBLE                                       AS min_position,
    max(position)::DOUBLE                                       AS max_position,
    count(*) FILTER (WHERE position < 0)                        AS n_negative_positions,
    count(*) FILTER (WHERE NOT isfinite(position::DOUBLE))      AS n_nonfinite_positions,
    count(*) FILTER (WHERE bucket IS NULL OR example_id IS NULL OR position IS NULL) AS n_null_keys,
    count(DISTINCT {sliding_window})                              AS n_windows,
    count(*) FILTER (WHERE {sliding_window} IS NULL)              AS n_null_windows,
    min({sliding_window})                                         AS sliding_window
FROM read_parquet($path)
