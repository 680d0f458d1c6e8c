"""The warehouse: everything between the capture files on disk and the DuckDB file, and what is drawn from it.

Subpackages, lowest first; each may import only the ones before it (and `plasticity`, `sql`):

- `warehouse.sources`: reading datasets (cards, shard catalog, head layout, revisions, the Hub, names
  that become paths, generated demo data).
- `warehouse.settings`: the run configuration and the option declarations shared by config files and flags.
- `warehouse.store`: the DuckDB file (connections, schema and migrations, results, models, families, exports).
- `warehouse.run`: running a model (loading rows, the worker pipeline, worker processes, the kernel cache).
- `warehouse.present`: plots and the validation report drawn from a warehouse.

Nothing here imports Dagster, `assets`, `dagster_project` or the command line (`cli`).
"""
