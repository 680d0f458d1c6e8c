-- Every row of a shard in canonical order (used when the shard fits the cap).
SELECT bucket, example_id, position, vector {extra_columns}
FROM read_parquet($path)
ORDER BY bucket, example_id, position
