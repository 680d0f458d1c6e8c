-- Shards of a model listed but not read yet (a streamed Hub run profiles each as its group is analysed):
-- no profile and no error, so the shard checks have not checked them.
SELECT count(*) FROM shards WHERE model = $model AND n_rows IS NULL AND error IS NULL
