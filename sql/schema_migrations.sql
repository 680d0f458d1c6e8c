-- One row per migration (sql/migrations/NNN_name.sql) applied to this warehouse;
-- the schema version is the highest `version`. A warehouse written before
-- versioning has no such table: version 0.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL,
    name VARCHAR NOT NULL,
    applied_at TIMESTAMP NOT NULL
);
