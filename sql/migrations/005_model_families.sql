-- Families of checkpoints: which family, stage and training step a model is.
-- The trajectory views over them come from sql/trajectories.sql (rerun after every upgrade).
ALTER TABLE models ADD COLUMN IF NOT EXISTS family VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS stage VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS step BIGINT;
