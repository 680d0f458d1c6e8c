-- Asset check: query heads whose key head (q_head // group) has no shard.
SELECT layer, q_head, k_head, q_path
FROM head_samples
WHERE model = $model AND k_path IS NULL
ORDER BY layer, q_head
