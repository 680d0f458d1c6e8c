"""Presenting a warehouse: the plots (per-model curves and heatmaps, comparisons, family trajectories,
attention figures) and the validation report of the attention tables.

May import: `plasticity`, `sql`, `warehouse.sources`, `warehouse.settings`, `warehouse.store`, and
modules of this subpackage (never `warehouse.run`).
"""
