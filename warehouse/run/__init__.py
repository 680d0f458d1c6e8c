"""Running a model: loading a head's rows from its shards, the pipeline that plans groups of heads,
computes them in worker processes and writes their results, the worker processes' lifetime, and
the cache of compiled kernels.

May import: `plasticity`, `sql`, `warehouse.sources`, `warehouse.settings`, `warehouse.store`, and
modules of this subpackage.
"""
