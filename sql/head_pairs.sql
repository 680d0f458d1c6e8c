-- GQA join: every query shard of the catalog with its key shard,
-- k_head = q_head // (num_q_heads / num_k_heads). A missing key shard yields
-- k_path NULL, which the pipeline records as an error for that head only.
SELECT
    q.layer,
    q.head                                   AS q_head,
    q.head // $group_size                    AS k_head,
    q.path                                   AS q_path,
    k.path                                   AS k_path,
    q.error                                  AS q_error,
    k.error                                  AS k_error
FROM shards AS q
LEFT JOIN shards AS k
    ON k.model = q.model AND k.kind = 'k' AND k.layer = q.layer AND k.head = q.head // $group_size
WHERE q.model = $model AND q.kind = 'q'
ORDER BY q.layer, k_head, q.head
