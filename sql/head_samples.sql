-- Query head -> key head pairing, k_head = q_head // $group_size, over the shard
-- catalog of one model, restricted to the heads the run config plans
-- (layer < $num_layers, q_head < $num_q_heads, layer in $layers when given).
SELECT
    q.model,
    q.revision,
    q.layer,
    q.head                                   AS q_head,
    q.head // $group_size                    AS k_head,
    q.path                                   AS q_path,
    k.path                                   AS k_path,
    q.n_rows                                 AS q_rows,
    k.n_rows                                 AS k_rows,
    least(q.n_rows, $cap)                    AS q_sample_rows,
    least(k.n_rows, $cap)                    AS k_sample_rows,
    q.dim                                    AS q_dim,
    k.dim                                    AS k_dim,
    q.n_buckets                              AS q_buckets,
    k.n_buckets                              AS k_buckets,
    q.sliding_window,
    q.error                                  AS q_error,
    k.error                                  AS k_error
FROM shards AS q
LEFT JOIN shards AS k
    ON k.model = q.model AND k.kind = 'k' AND k.layer = q.layer AND k.head = q.head // $group_size
WHERE q.model = $model AND q.kind = 'q'
  AND q.layer < $num_layers AND q.head < $num_q_heads
  AND ($layers IS NULL OR list_contains($layers, q.layer))
ORDER BY q.layer, q.head
