-- Asset check: values of {column} in {table} outside [0, 1] for one model's run
-- (NaN/NULL are allowed: they mean "nothing eligible").
SELECT * EXCLUDE (model, run_id)
FROM {table}
WHERE model = $model AND run_id = $run_id
  AND {column} IS NOT NULL AND NOT isnan({column})
  AND ({column} < 0 OR {column} > 1)
ORDER BY ALL
