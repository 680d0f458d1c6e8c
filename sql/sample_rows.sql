-- Deterministic subsample of at most $cap rows (SPEC 2.1).
-- Rows are ranked by hash(seed, example_id, position) with (example_id, position)
-- as tie-break: a total order that does not depend on file layout or thread count.
-- Phase 1 ranks only the scalar columns; phase 2 fetches the vectors of the chosen
-- rows, so the sort never carries vector payloads. Output in canonical order.
WITH chosen AS (
    SELECT file_row_number
    FROM read_parquet($path, file_row_number = true)
    ORDER BY hash($seed::BIGINT, example_id::BIGINT, position::DOUBLE), example_id, position
    LIMIT $cap
)
SELECT t.bucket, t.example_id, t.position, t.vector {extra_columns}
FROM read_parquet($path, file_row_number = true) AS t
SEMI JOIN chosen USING (file_row_number)
ORDER BY t.bucket, t.example_id, t.position
