-- The heads of one model a run plans, over its shard catalog: every query shard, and every query
-- head the layout expects (each q_head < $num_q_heads of each layer in $expected_layers), paired
-- with its key head k_head = q_head // $group_size, restricted to $layers when given.
-- plan_problem says why a head cannot be analysed, before any shard is read:
--   missing_query_shard  expected, but no shard names it
--   layout_mismatch      its shard's layer >= $num_layers or q_head >= $num_q_heads
--   missing_key_shard    no shard names its key head
-- Two shard folders naming one head (l0h0q, l00h00q) give one row; the catalog marked both
-- (duplicate_shard), so the head fails with that error.
WITH q AS (
    SELECT * FROM shards
    WHERE model = $model AND kind = 'q'
    QUALIFY row_number() OVER (PARTITION BY layer, head ORDER BY path) = 1
), k AS (
    SELECT * FROM shards
    WHERE model = $model AND kind = 'k'
    QUALIFY row_number() OVER (PARTITION BY layer, head ORDER BY path) = 1
), expected AS (
    SELECT e.layer::INTEGER AS layer, h.range::INTEGER AS head
    FROM unnest($expected_layers::INTEGER[]) AS e(layer), range($num_q_heads) AS h
), heads AS (
    SELECT coalesce(q.layer, e.layer) AS layer, coalesce(q.head, e.head) AS q_head,
           q.path, q.n_rows, q.dim, q.n_buckets, q.sliding_window, q.error
    FROM q FULL OUTER JOIN expected AS e ON e.layer = q.layer AND e.head = q.head
)
SELECT
    $model                                   AS model,
    (SELECT any_value(revision) FROM shards WHERE model = $model) AS revision,
    h.layer,
    h.q_head,
    h.q_head // $group_size                  AS k_head,
    h.path                                   AS q_path,
    k.path                                   AS k_path,
    h.n_rows                                 AS q_rows,
    k.n_rows                                 AS k_rows,
    least(h.n_rows, $cap)                    AS q_sample_rows,
    least(k.n_rows, $cap)                    AS k_sample_rows,
    h.dim                                    AS q_dim,
    k.dim                                    AS k_dim,
    h.n_buckets                              AS q_buckets,
    k.n_buckets                              AS k_buckets,
    h.sliding_window,
    h.error                                  AS q_error,
    k.error                                  AS k_error,
    CASE
        WHEN h.path IS NULL THEN 'missing_query_shard'
        WHEN h.layer >= $num_layers OR h.q_head >= $num_q_heads THEN 'layout_mismatch'
        WHEN k.path IS NULL THEN 'missing_key_shard'
    END                                      AS plan_problem
FROM heads AS h
LEFT JOIN k ON k.layer = h.layer AND k.head = h.q_head // $group_size
WHERE $layers IS NULL OR list_contains($layers, h.layer)
ORDER BY h.layer, h.q_head
