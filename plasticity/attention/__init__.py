"""Attention patterns rebuilt from captured queries and keys (docs/method.md#attention-patterns).

Pure numpy and a numba kernel (float64 throughout); no I/O. For one head, every captured query
attends over the captured keys of its own example that it may see:
``a = softmax(s * q . k / sqrt(d))`` (``s`` the query scale; 1.0 outside the sweep).

Modules, one idea each:

* `visibility`  which keys a query may see; key coverage and exact rows
* `scan`        the pass over a head's examples, blocks of query rows, tiled scores
* `kernel`      the compiled per-row statistics (softmax sums, k_eff selection, checks, pairs)
* `scale_plan`  the weights of every query scale from one exp per score
* `summary`     token rows, the per-head summary (exact rows only), the sweep, the status
* `gain`        gain of the query-scale sweep, gain ratios, entropy monotonicity
* `classify`    sharp / medium / uniform
* `reference`   dense attention of one example (small inputs, checks)
* `inputs`      input checks (windows, positions, scales, token codes)
* `columns`     column names, defaults, statuses
"""

from .classify import attention_class
from .columns import (
    ADJACENT_DELTA, DEFAULT_LOCAL_WINDOW, DEFAULT_SCALES, DISTANT_DELTA, ESTIMABLE_STATUSES, ROW_MODES,
    STATUS_EXACT, STATUS_NOT_ESTIMABLE, STATUS_PARTIAL, STATUS_SKIPPED, SUMMARY_COLUMNS, SWEEP_COLUMNS,
    TOKEN_COLUMNS,
)
from .gain import entropy_falls_monotonically, gain_fit, gain_ratio
from .reference import attention_weights
from .visibility import visible_mask

# Importing the kernel module compiles its numba functions (or loads them from numba's cache):
# about a second warm, several on an empty cache. Names that need it are imported on first use,
# so code that reads only column names or the gain helpers (the CLI, the report) does not pay.
_NEED_KERNEL = {"K_EFF_MASS": "kernel", "head_attention_metrics": "summary", "query_variation": "summary",
                "token_attention_metrics": "summary"}


def __getattr__(name: str):
    if name in _NEED_KERNEL:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_NEED_KERNEL[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADJACENT_DELTA",
    "DEFAULT_LOCAL_WINDOW",
    "DEFAULT_SCALES",
    "DISTANT_DELTA",
    "ESTIMABLE_STATUSES",
    "K_EFF_MASS",
    "ROW_MODES",
    "STATUS_EXACT",
    "STATUS_NOT_ESTIMABLE",
    "STATUS_PARTIAL",
    "STATUS_SKIPPED",
    "SUMMARY_COLUMNS",
    "SWEEP_COLUMNS",
    "TOKEN_COLUMNS",
    "attention_class",
    "attention_weights",
    "entropy_falls_monotonically",
    "gain_fit",
    "gain_ratio",
    "head_attention_metrics",
    "query_variation",
    "token_attention_metrics",
    "visible_mask",
]
