-- Dataset checks: the category of a shard's error, and why a planned head cannot run.
-- The new tables models and catalog_problems come from schema.sql (CREATE TABLE IF NOT EXISTS).
ALTER TABLE shards ADD COLUMN IF NOT EXISTS problem VARCHAR;
ALTER TABLE head_samples ADD COLUMN IF NOT EXISTS plan_problem VARCHAR;
