-- Asset check: rows of {table} repeating the natural key ({keys}) within one model's run.
SELECT {keys}, count(*) AS n_copies
FROM {table}
WHERE model = $model AND run_id = $run_id
GROUP BY {keys}
HAVING count(*) > 1
ORDER BY {keys}
