-- Observed position range of every bucket of a shard (works for uniform and log buckets).
SELECT
    bucket,
    count(*)                  AS n_rows,
    min(position)::DOUBLE     AS min_position,
    max(position)::DOUBLE     AS max_position,
    avg(position::DOUBLE)     AS mean_position
FROM read_parquet($path)
GROUP BY bucket
ORDER BY bucket
