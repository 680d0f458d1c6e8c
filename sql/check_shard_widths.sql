-- Asset check: every shard of a model must have the same vector width.
-- Returns one row per width when there is more than one (NULL widths come from
-- plain list<float> columns and are checked when the rows are loaded).
WITH widths AS (
    SELECT dim, count(*) AS n_shards, min(path) AS example_path
    FROM shards
    WHERE model = $model AND dim IS NOT NULL
    GROUP BY dim
)
SELECT dim, n_shards, example_path FROM widths
WHERE (SELECT count(*) FROM widths) > 1
ORDER BY n_shards DESC, dim
