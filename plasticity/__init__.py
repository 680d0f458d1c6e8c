"""Attention-plasticity math: pure functions on numpy arrays (no I/O)."""

#: Version of what the stored numbers mean. It is part of every run id, so a change to how any
#: stored value is defined or estimated starts a new run instead of resuming (and mixing with)
#: results computed under the old definition. Bump it with every such change.
ANALYSIS_VERSION = 3
