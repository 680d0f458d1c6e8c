-- Column descriptions stored in the warehouse (DuckDB COMMENT ON), shown by
-- `SELECT table_name, column_name, comment FROM duckdb_columns()`. The metric
-- reference is docs/metrics.md.
COMMENT ON COLUMN runs.status IS 'running | succeeded | partial | failed | interrupted: a run that stopped early is never left running';
COMMENT ON COLUMN runs.error IS 'why the run stopped early (interrupted or failed mid-way), e.g. KeyboardInterrupt; NULL when it ran to the end';
COMMENT ON COLUMN schema_migrations.version IS 'number of a migration (sql/migrations/NNN_name.sql) applied to this warehouse; the schema version is the highest';
COMMENT ON COLUMN schema_migrations.name IS 'file name of the migration';
COMMENT ON COLUMN schema_migrations.applied_at IS 'when it was applied (UTC)';
