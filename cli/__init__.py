"""The `plasticity` command line (`cli.main`), its `plot` subcommand (`cli.plot`) and `ui` (`cli.ui`).

May import: `plasticity`, `sql`, `warehouse`; `dagster_project` and Dagster only inside `ui`, when it runs.
"""
