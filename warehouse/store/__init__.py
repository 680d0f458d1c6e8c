"""The store: the DuckDB warehouse file (connections, locking, the schema and its migrations), the rows
written for a run (results, models, families of checkpoints) and the exports read back from it.

The only place that opens a warehouse file. May import: `plasticity`, `sql`, `warehouse.sources`,
`warehouse.settings`, and modules of this subpackage.
"""
