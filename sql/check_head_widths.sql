-- Asset check: query and key vectors of a head pair must have the same width.
SELECT layer, q_head, k_head, q_dim, k_dim, q_path, k_path
FROM head_samples
WHERE model = $model AND q_dim IS NOT NULL AND k_dim IS NOT NULL AND q_dim <> k_dim
ORDER BY layer, q_head
