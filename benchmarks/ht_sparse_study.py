"""Would inverse-probability (Horvitz-Thompson) weights rescue attention sums on a sparse capture?

    .venv/bin/python benchmarks/ht_sparse_study.py

On the tiny-llama sparse capture (tests/fixtures/tiny-llama/sparse: queries and keys kept with
probability pi = 1/8 per position, independently), every row sees a random subset S of its keys.
For the quantities that are sums over keys, HT weights 1/pi give unbiased sums:

    Z_hat = sum_{j in S} e^{s_j} / pi          (softmax normaliser; reported as log Z)
    H_hat = log Z_hat - sum_{j in S} e^{s_j} s_j / (pi Z_hat) = H_S + log(1/pi)
    near  = (mass on keys <= 5 back) / Z      -> the 1/pi cancels: identical to the uncorrected ratio
    near per key = near / n_near_visible (HT)  vs  near / n_near_captured (uncorrected)
    row_std: sum p^2 = pi * sum_S e^{2 s} / Z_S^2 (HT)

Each head's value is the mean over its captured query rows; the truth is the model's own mean
over all 2048 queries (truth/head_truth.csv; log Z and the near-key mass from the dense capture).
The script prints, per quantity, the mean |relative error| of the uncorrected and the HT values
and in how many of the 18 heads HT is closer, and -- for the HT values -- the standard error from a
delete-a-group jackknife over 16 random groups of positions (queries and keys of a group dropped
together, the remaining weights scaled by 16/15), with the share of heads whose error is within
2 standard errors (a calibrated SE gives ~95%). pi is the card's 1/8; the estimate from the shard
(captured key positions / positions the examples span) is printed beside it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from conftest import TINY_LLAMA, read_shard  # noqa: E402

PI_CARD = 1 / 8  # the card's sampler: UniformSampler(base_rate=8, bucket_size=64)
N_GROUPS = 16
NEAR = 5


def head_rows(root, layer, q_head):
    """Per example: query positions and vectors, key positions and vectors (sorted by position)."""
    q = read_shard(root, layer, q_head, "q")
    k = read_shard(root, layer, q_head // 3, "k")
    out = {}
    for e in np.unique(q.example_id):
        qi = np.flatnonzero(q.example_id == e)
        ki = np.flatnonzero(k.example_id == e)
        qi, ki = qi[np.argsort(q.position[qi])], ki[np.argsort(k.position[ki])]
        out[int(e)] = (q.position[qi].astype(int), q.vectors[qi], k.position[ki].astype(int), k.vectors[ki])
    return out


def row_sums(rows, drop_group=None, groups=None):
    """Per captured query row with >= 1 visible key: the sums the estimators need. A jackknife
    replicate drops the queries and keys whose position is in group ``drop_group``."""
    frames = []
    for e, (qp, qv, kp, kv) in rows.items():
        if drop_group is not None:
            keep_q, keep_k = groups[e][qp] != drop_group, groups[e][kp] != drop_group
            qp, qv, kp, kv = qp[keep_q], qv[keep_q], kp[keep_k], kv[keep_k]
        vis = kp[None, :] <= qp[:, None]
        has = vis.any(axis=1)
        scores = np.where(vis, qv @ kv.T / math.sqrt(qv.shape[1]), -np.inf)[has]
        vis, qp = vis[has], qp[has]
        top = scores.max(axis=1)
        a = np.where(vis, scores - top[:, None], 0.0)
        z = np.where(vis, np.exp(a), 0.0)
        near = vis & (qp[:, None] - kp[None, :] <= NEAR)
        frames.append({"pos": qp, "top": top, "Z": z.sum(1), "ZA": (z * a).sum(1), "Z2": (z * z).sum(1),
                       "ZN": (z * near).sum(1), "n_near": near.sum(1), "n": vis.sum(1)})
    return SimpleNamespace(**{k: np.concatenate([f[k] for f in frames]) for k in frames[0]})


def estimates(r: SimpleNamespace, w: float) -> dict:
    """Head means, uncorrected and with HT weight ``w`` (= 1/pi, times 16/15 in a jackknife replicate)."""
    H_s = np.log(r.Z) - r.ZA / r.Z
    late = r.pos >= 2
    with np.errstate(divide="ignore", invalid="ignore"):  # log(1) = 0 denominators are filtered out
        far6 = r.pos >= 6
        nv = r.pos + 1
        unc_near = (r.ZN / r.Z / r.n_near)[far6 & (r.n_near > 0) & (r.n > r.n_near)]
        unc_far = ((1 - r.ZN / r.Z) / (r.n - r.n_near))[far6 & (r.n_near > 0) & (r.n > r.n_near)]
        ht_near = (r.ZN / r.Z / (NEAR + 1))[far6]
        ht_far = ((1 - r.ZN / r.Z) / (nv - NEAR - 1))[far6]
        sum_p2_s = r.Z2 / r.Z ** 2
        ratio = H_s / np.log(r.n)
    return {
        "mean_entropy": (H_s[late].mean(), (H_s + math.log(w))[late].mean()),
        "mean_entropy_ratio": (ratio[late & (r.n >= 2)].mean(),
                               ((H_s + math.log(w)) / np.log(r.pos + 1))[late].mean()),
        "mean_log_normaliser": ((r.top + np.log(r.Z)).mean(), (r.top + np.log(r.Z * w)).mean()),
        "near_mass_frac": ((r.ZN / r.Z)[far6].mean(), (r.ZN / r.Z)[far6].mean()),
        "local_attn_near": (unc_near.mean(), ht_near.mean()),
        "local_attn_far": (unc_far.mean(), ht_far.mean()),
        "local_bias_ratio": (unc_near.mean() / unc_far.mean(), ht_near.mean() / ht_far.mean()),
        "row_std": (np.sqrt(np.maximum(sum_p2_s / r.n - 1 / r.n ** 2, 0)).mean(),
                    np.sqrt(np.maximum(sum_p2_s / w / nv - 1 / nv ** 2, 0)).mean()),
    }


def dense_truth(layer, q_head) -> dict:
    r = row_sums(head_rows(TINY_LLAMA / "dense" / "tinyllama", layer, q_head))
    return {"mean_log_normaliser": (r.top + np.log(r.Z)).mean(), "near_mass_frac": (r.ZN / r.Z)[r.pos >= 6].mean()}


def study() -> tuple[pd.DataFrame, list[float]]:
    """One row per (head, quantity): truth, uncorrected and HT head means, the HT jackknife SE, the
    relative errors and z = (HT - truth) / SE; and the key capture probability estimated per head."""
    truth = pd.read_csv(TINY_LLAMA / "truth" / "head_truth.csv").set_index(["layer", "q_head"])
    rng = np.random.default_rng(0)
    records, pis = [], []
    for layer in range(3):
        for q_head in range(6):
            rows = head_rows(TINY_LLAMA / "sparse" / "tinyllama_sparse", layer, q_head)
            spans = sum(max(qp.max(initial=0), kp.max(initial=0)) + 1 for qp, _, kp, _ in rows.values())
            pis.append(sum(kp.size for _, _, kp, _ in rows.values()) / spans)
            full = estimates(row_sums(rows), 1 / PI_CARD)
            groups = {e: rng.integers(0, N_GROUPS, 512) for e in rows}
            reps = [estimates(row_sums(rows, g, groups), N_GROUPS / (N_GROUPS - 1) / PI_CARD) for g in range(N_GROUPS)]
            want = {**truth.loc[(layer, q_head)].to_dict(), **dense_truth(layer, q_head)}
            for name, (unc, ht) in full.items():
                ht_reps = np.array([r[name][1] for r in reps])
                se = math.sqrt((N_GROUPS - 1) / N_GROUPS * ((ht_reps - ht_reps.mean()) ** 2).sum())
                records.append({"layer": layer, "q_head": q_head, "quantity": name, "truth": want[name],
                                "uncorrected": unc, "ht": ht, "ht_se": se})
    df = pd.DataFrame(records)
    df["err_unc"] = (df.uncorrected - df.truth).abs() / df.truth.abs()
    df["err_ht"] = (df.ht - df.truth).abs() / df.truth.abs()
    df["z"] = (df.ht - df.truth) / df.ht_se
    return df, pis


def main() -> int:
    df, pis = study()
    print(f"key capture probability: card {PI_CARD:.4f}; estimated from the shards {np.mean(pis):.4f} "
          f"(per head {min(pis):.4f}-{max(pis):.4f})\n")
    print("| quantity | mean rel. error, uncorrected | mean rel. error, HT | heads where HT is closer | "
          "HT within 2 SE of the truth |")
    print("|---|---:|---:|---:|---:|")
    for name, g in df.groupby("quantity", sort=False):
        same = np.allclose(g.uncorrected, g.ht, rtol=1e-12)
        closer = "identical" if same else f"{int((g.err_ht < g.err_unc).sum())}/{len(g)}"
        within = f"{int((g.z.abs() <= 2).sum())}/{len(g)}" if not same else "-"
        print(f"| {name} | {g.err_unc.mean():.3f} | {g.err_ht.mean():.3f} | {closer} | {within} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
