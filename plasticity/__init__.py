"""Attention-plasticity math: pure functions on numpy arrays (no I/O)."""

#: Version of what the stored numbers mean. It is part of every run id, so a change to how any
#: stored value is defined or estimated starts a new run instead of resuming (and mixing with)
#: results computed under the old definition. Bump it with every such change.
# 3: heads whose shards fail the input value checks (buckets vs positions, windows, too few query rows,
#    integer ranges) get an error instead of numbers, so which heads hold numbers changed
# 4: ap_overall_se is an example-resampling (delete-a-group jackknife) standard error; the former
#    pair-only value is ap_overall_se_pairs
# 5: attention (docs/method.md#attention-patterns) summaries use exact rows only (coverage), attention: auto by default, and
#    the entropy of sharp rows is computed to full precision (log1p)
ANALYSIS_VERSION = 5
