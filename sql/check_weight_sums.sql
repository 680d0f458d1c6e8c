-- Asset check: the component weights of every head must sum to 1 (docs/method.md#component-weights).
SELECT layer, q_head, k_head, sum(weight) AS weight_sum, count(*) AS n_components
FROM head_component_weights
WHERE model = $model AND run_id = $run_id
GROUP BY layer, q_head, k_head
HAVING sum(weight) IS NULL OR isnan(sum(weight)) OR abs(sum(weight) - 1) > $tolerance
ORDER BY layer, q_head
