-- Rows of {table} in one model's run (the denominator of the result checks).
SELECT count(*) FROM {table} WHERE model = $model AND run_id = $run_id
