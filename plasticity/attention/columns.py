"""Column names of the three attention tables, the defaults, and the per-head statuses."""

from __future__ import annotations

DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
ADJACENT_DELTA = 1
DISTANT_DELTA = 10
DEFAULT_LOCAL_WINDOW = 5

#: ``rows`` of `head_attention_metrics`: compute every query row that sees a key ("all",
#: ``attention: true``) or only the exact rows, and nothing when a head has too few of them
#: ("exact", ``attention: auto``).
ROW_MODES = ("all", "exact")

#: Per-head ``status``: every query row exact; enough exact rows (summaries use those only);
#: too few exact rows (computed, summaries NaN); too few exact rows (not computed: auto).
STATUS_EXACT = "exact"
STATUS_PARTIAL = "partial"
STATUS_NOT_ESTIMABLE = "not_estimable"
STATUS_SKIPPED = "skipped"
ESTIMABLE_STATUSES = (STATUS_EXACT, STATUS_PARTIAL)

TOKEN_COLUMNS: tuple[str, ...] = (
    "bucket",
    "example_id",
    "position",
    "entropy",
    "entropy_ratio",
    "max_attn",
    "k_eff",
    "query_norm",
    "n_keys",
    "n_visible",
    "key_coverage",
    "row_std",
    "exact",
)

SWEEP_COLUMNS: tuple[str, ...] = (
    "scale",
    "mean_entropy",
    "mean_entropy_ratio",
    "mean_max_attn",
    "mean_k_eff",
    "mean_row_std",
)

SUMMARY_COLUMNS: tuple[str, ...] = (
    "n_queries",
    "n_queries_with_keys",
    "n_examples",
    "head_dim",
    "sliding_window",
    "mean_entropy",
    "mean_entropy_ratio",
    "mean_max_attn",
    "mean_k_eff",
    "mean_query_norm",
    "mean_n_keys",
    "mean_key_coverage",
    "row_std",
    "attn_class",
    "local_window",
    "local_attn_near",
    "local_attn_far",
    "local_bias_ratio",
    "same_token_attn",
    "diff_token_attn",
    "same_token_ratio",
    "qvar_l2_adjacent",
    "qvar_l2_distant",
    "qvar_pairs_adjacent",
    "qvar_pairs_distant",
    "max_row_sum_error",
    "max_future_weight",
    "max_window_weight",
    "gain",
    "gain_r2",
    "entropy_monotonic",
    "status",
    "status_reason",
    "n_exact_rows",
    "exact_row_frac",
    "min_exact_rows",
)
