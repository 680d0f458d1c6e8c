-- Deterministic subsample of at most $cap rows of one shard (docs/method.md#sampling).
-- `shard_keys` holds every row's file row number, example_id and position (the
-- loader registers them from the Arrow table it already read, so only the
-- scalar columns are ranked and the vectors are never sorted). Rows are ranked
-- by hash(seed, example_id, position) with (example_id, position) as tie-break:
-- a total order that does not depend on file layout or thread count. The loader
-- puts the chosen rows in canonical order (bucket, example_id, position).
SELECT row_number
FROM shard_keys
ORDER BY hash($seed::BIGINT, example_id::BIGINT, position::DOUBLE), example_id, position
LIMIT $cap
