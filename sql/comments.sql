-- One-line descriptions of the columns this branch adds or changes, shown by DESCRIBE /
-- duckdb_columns(); each is the 'meaning' cell of docs/metrics.md. Runs after sql/views.sql
-- (CREATE OR REPLACE VIEW drops a view's comments), so latest_runs gets its own.
COMMENT ON TABLE schema_migrations IS 'One row per migration (sql/migrations/NNN_name.sql) applied to this warehouse; the schema version is the highest version';
COMMENT ON COLUMN schema_migrations.version IS 'Number of a migration applied to this warehouse; the schema version is the highest';
COMMENT ON COLUMN schema_migrations.name IS 'File name of the migration in sql/migrations';
COMMENT ON COLUMN schema_migrations.applied_at IS 'When the migration was applied, UTC';
COMMENT ON COLUMN runs.ended_at IS 'When the run finished or stopped early, UTC; NULL while running or after its process was killed';
COMMENT ON COLUMN runs.status IS 'running, succeeded (no head failed), partial (some heads failed), failed (no head has results, or an error stopped the run) or interrupted (stopped by a signal or a cancelled Dagster run)';
COMMENT ON COLUMN runs.n_done IS 'Heads with a head_metrics row when the run finished or stopped';
COMMENT ON COLUMN runs.n_errors IS 'Heads with a head_errors row when the run finished or stopped';
COMMENT ON COLUMN runs.error IS 'Why the run stopped early, as ExceptionType: message (e.g. KeyboardInterrupt: signal 15); NULL when it ran to the end';
COMMENT ON COLUMN latest_runs.ended_at IS 'When the run finished or stopped early, UTC; NULL while running or after its process was killed';
COMMENT ON COLUMN latest_runs.status IS 'running, succeeded (no head failed), partial (some heads failed), failed (no head has results, or an error stopped the run) or interrupted (stopped by a signal or a cancelled Dagster run)';
COMMENT ON COLUMN latest_runs.n_done IS 'Heads with a head_metrics row when the run finished or stopped';
COMMENT ON COLUMN latest_runs.n_errors IS 'Heads with a head_errors row when the run finished or stopped';
COMMENT ON COLUMN latest_runs.error IS 'Why the run stopped early, as ExceptionType: message (e.g. KeyboardInterrupt: signal 15); NULL when it ran to the end';
