-- Version 1: runs.error says why a run stopped early (interrupted or failed mid-way),
-- so no run is left 'running'. Warehouses written before schema versioning lack it.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR;
