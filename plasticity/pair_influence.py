"""Pair side of the example jackknife (`ap_overall_se`; docs/method.md#attention-plasticity): what each example group's key pairs
add to every cell, and how each bucket's AP moves when its query model moves.

A bucket's AP_j is the mean of its cells with pairs, a cell's the mean of its pairs; with the slopes
``dAP/dm``, ``dAP/dv`` of each pair (`plasticity.pair_ap.ap_with_slopes`) and the weight
``w_k = 1 / (K_j P_c)`` of pair k (``K_j`` cells with pairs, ``P_c`` pairs in its cell):

    dAP_j/dmean = sum_k w_k dAP/dm_k D_k,          dAP_j/dC = sum_k w_k dAP/dv_k D_k D_k^T   (bucket_full_cov),
    dAP_j/dresid_var_c = sum_k w_k dAP/dv_k D_kc^2                                         (linear_diag).

The key side is kept exactly: per cell and example group, the sum of the pair APs and the number of
pairs, so a replicate without a group removes exactly that group's pairs (the draws stay as drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairInfluence:
    """Pair-side input of the jackknife, one row per cell of the `CellTable` (stream order) and per
    query bucket of the model (index ``jj`` into ``QueryBuckets``).

    ``cell_group_ap`` (cells, G): sum of the pair APs of each cell by example group of the pair;
    ``cell_group_pairs`` (cells, G): the number of those pairs. ``grad_mean`` (J, d): dAP_j/dmean;
    ``grad_cov`` (J, d, d): dAP_j/dC (bucket_full_cov), ``grad_diag`` (J, d): dAP_j/dresid_var
    (linear_diag); all in the rotated basis of the model. Buckets without pairs have zero rows.
    """

    n_groups: int
    cell_group_ap: np.ndarray
    cell_group_pairs: np.ndarray
    grad_mean: np.ndarray
    grad_cov: np.ndarray | None
    grad_diag: np.ndarray | None


class PairInfluenceBuilder:
    """Collects `PairInfluence` bucket by bucket inside the pair pass (`plasticity_cells`)."""

    def __init__(self, key_group: np.ndarray, n_groups: int, n_buckets: int, d: int, full_cov: bool, basis=None):
        """``basis`` (a `KeyBasis`): the differences come in the raw basis and the gradients are brought
        to the rotated one (`KeyBasis.pull_mean`, `KeyBasis.pull_cov`) when the pass ends."""
        self.key_group = np.asarray(key_group, dtype=np.int64)
        self.basis = basis
        self.G = int(n_groups)
        self.grad_mean = np.zeros((n_buckets, d))
        self.grad_cov = np.zeros((n_buckets, d, d)) if full_cov else None
        self.grad_diag = None if full_cov else np.zeros((n_buckets, d))
        self.cov00 = np.zeros(n_buckets)
        self._ap: list[np.ndarray] = []
        self._pairs: list[np.ndarray] = []

    def add_bucket(self, jj: int, sizes: np.ndarray, i1: np.ndarray, ap: np.ndarray,
                   dap_dm: np.ndarray, dap_dv: np.ndarray, D: np.ndarray, cov00_slope: np.ndarray | None = None) -> None:
        """Record bucket ``jj``: its cells' pair counts ``sizes``, first key row ``i1`` of each pair (the
        pair's example), pair APs and slopes, and the key differences ``D`` the moments were computed
        from. ``D`` is used as scratch and overwritten. ``cov00_slope``: a further slope of each pair's
        AP in the rotated ``C[0, 0]`` alone (the debiased AP's mean noise depends on it)."""
        nc = sizes.shape[0]
        cell = np.repeat(np.arange(nc), sizes)
        slot = cell * self.G + self.key_group[i1]
        self._ap.append(np.bincount(slot, weights=ap, minlength=nc * self.G).reshape(nc, self.G))
        self._pairs.append(np.bincount(slot, minlength=nc * self.G).reshape(nc, self.G))
        n_cells = int(np.count_nonzero(sizes))
        if n_cells == 0:
            return
        weight = 1.0 / (n_cells * sizes[cell])  # sizes[cell] >= 1 for every pair
        self.grad_mean[jj] = D.T @ (weight * dap_dm)
        if cov00_slope is not None:
            self.cov00[jj] = float(weight @ cov00_slope)
        if self.grad_cov is not None:
            cw = weight * dap_dv
            if np.all(cw >= 0.0):
                D *= np.sqrt(cw)[:, None]
                self.grad_cov[jj] = D.T @ D  # one syrk: the weights are non-negative
            else:
                self.grad_cov[jj] = (D * cw[:, None]).T @ D
        else:
            np.multiply(D, D, out=D)
            self.grad_diag[jj] = D.T @ (weight * dap_dv)

    def add_empty(self, n_cells: int) -> None:
        """A bucket whose eligible cells drew no pair at all."""
        self._ap.append(np.zeros((n_cells, self.G)))
        self._pairs.append(np.zeros((n_cells, self.G), np.int64))

    def build(self) -> PairInfluence:
        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, self.G), dtype)

        grad_mean, grad_cov = self.grad_mean, self.grad_cov
        if self.basis is not None:
            grad_mean = self.basis.pull_mean(grad_mean)
            grad_cov = None if grad_cov is None else self.basis.pull_cov(grad_cov)
        if grad_cov is not None and np.any(self.cov00):
            grad_cov = grad_cov.copy() if grad_cov is self.grad_cov else grad_cov
            grad_cov[:, 0, 0] += self.cov00  # already a rotated-basis slope
        return PairInfluence(
            n_groups=self.G,
            cell_group_ap=cat(self._ap, np.float64),
            cell_group_pairs=cat(self._pairs, np.int64),
            grad_mean=grad_mean,
            grad_cov=grad_cov,
            grad_diag=self.grad_diag,
        )
