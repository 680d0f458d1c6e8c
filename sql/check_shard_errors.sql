-- Asset check: shards of a model that failed schema/content validation.
SELECT layer, head, kind, path, error
FROM shards
WHERE model = $model AND error IS NOT NULL
ORDER BY layer, kind, head
