"""Synthetic sniffer data with known attention plasticity.

The generator draws, for every head, queries from exactly the model that the
`bucket_full_cov` estimator assumes (SPEC 2.8), written in a random orthonormal
basis ``B`` of R^d:

    y = B^T q,    y_0 = a + b * p / L + sigma0 * e_0           (positional axis)
                  y_s = mu + sigma * c_j * M e_s                (semantic axes, d-1)

with ``p`` the position, ``L`` the sequence length, ``c_j`` a per-bucket scale
and ``M`` a fixed mixing matrix, so the true semantic covariance of bucket j is
``Sigma_j = sigma^2 c_j^2 M M^T``. Keys are Gaussian around a fixed mean. The
noise scale ``sigma`` sets the plasticity: ``sigma -> 0`` makes the query
deterministic (AP -> 0), a zero mean with any noise gives AP = 1.

`true_head_plasticity` evaluates the SPEC 2.8 formula with these true
parameters over (a large sample of) all same-example key pairs. It is written
independently of `plasticity.estimators` (plain per-cell enumeration) so that
the estimator can be tested against it.

Everything here is pure: arrays in, arrays out. Writing Parquet lives in
`warehouse.demo_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from plasticity.types import TokenArrays


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a synthetic model dataset."""

    model: str = "synthetic-demo"
    num_layers: int = 4
    num_q_heads: int = 4
    num_k_heads: int = 2
    head_dim: int = 16
    num_examples: int = 16
    seq_len: int = 512
    bucket_size: int = 64
    capture_fraction: float = 1.0  # 1.0 = dense capture of every position (sampler "all")
    sliding_windows: dict[int, int] = field(default_factory=lambda: {3: 128})  # layer -> window
    noise_scales: tuple[float, ...] | None = None  # per q head index within a layer, cycled
    layer_noise_scales: tuple[tuple[float, ...], ...] | None = None  # per layer, per q head (a family's checkpoint)
    vocab_size: int = 50
    seed: int = 0

    @property
    def group(self) -> int:
        if self.num_q_heads % self.num_k_heads:
            raise ValueError("num_q_heads must be a multiple of num_k_heads")
        return self.num_q_heads // self.num_k_heads


@dataclass(frozen=True)
class HeadTruth:
    """The true generating parameters of one query head."""

    layer: int
    q_head: int
    basis: np.ndarray  # (d, d) orthonormal; column 0 is the positional axis
    a: float
    b: float
    sigma0: float
    sigma: float
    mu: np.ndarray  # (d-1,)
    mixing: np.ndarray  # (d-1, d-1)
    pure_noise: bool


def _rng(spec: SyntheticSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, *key])


def head_noise_scale(spec: SyntheticSpec, layer: int, q_head: int) -> tuple[float, bool]:
    """Noise scale of a head and whether it is a pure-noise (zero-mean) head.

    Heads sweep sigma over a log grid from 1e-3 (near-deterministic, AP ~ 0) to
    10 (noise-dominated, AP ~ 1); the last head of the first layer is pure noise.
    """
    n_heads = spec.num_layers * spec.num_q_heads
    idx = layer * spec.num_q_heads + q_head
    if spec.layer_noise_scales is not None:
        return float(spec.layer_noise_scales[layer][q_head]), False
    if spec.noise_scales is not None:
        return float(spec.noise_scales[q_head % len(spec.noise_scales)]), False
    if layer == 0 and q_head == spec.num_q_heads - 1:
        return 1.0, True
    grid = np.logspace(-3, 1, n_heads)
    # interleave so every layer holds low and high plasticity heads
    order = (idx * 7) % n_heads
    return float(grid[order]), False


def head_truth(spec: SyntheticSpec, layer: int, q_head: int) -> HeadTruth:
    d = spec.head_dim
    rng = _rng(spec, 1, layer, q_head)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sigma, pure = head_noise_scale(spec, layer, q_head)
    mu = rng.standard_normal(d - 1)
    mu /= max(np.linalg.norm(mu), 1e-12)
    mixing = np.eye(d - 1) + 0.3 * rng.standard_normal((d - 1, d - 1)) / np.sqrt(max(d - 1, 1))
    if pure:
        return HeadTruth(layer, q_head, basis, 0.0, 0.0, sigma, sigma, np.zeros(d - 1), mixing, True)
    return HeadTruth(layer, q_head, basis, 1.0, 2.0, sigma, sigma, mu, mixing, False)


def bucket_scale(bucket: np.ndarray) -> np.ndarray:
    """c_j: per-bucket semantic noise scale (varies so bucket covariances differ)."""
    return 1.0 + 0.5 * np.sin(np.asarray(bucket, dtype=np.float64))


def example_layout(spec: SyntheticSpec, kind_key: int, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(example_id, position) of the captured rows of one shard, sorted."""
    if spec.capture_fraction >= 1.0:
        ex = np.repeat(np.arange(spec.num_examples), spec.seq_len)
        pos = np.tile(np.arange(spec.seq_len), spec.num_examples)
        return ex, pos
    rng = _rng(spec, 2, kind_key, layer, head)
    keep = rng.random(spec.num_examples * spec.seq_len) < spec.capture_fraction
    ex = np.repeat(np.arange(spec.num_examples), spec.seq_len)[keep]
    pos = np.tile(np.arange(spec.seq_len), spec.num_examples)[keep]
    return ex, pos


def token_strings(spec: SyntheticSpec, example_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Token text per (example, position), shared by every head of the model."""
    rng = _rng(spec, 3)
    table = rng.integers(0, spec.vocab_size, size=(spec.num_examples, spec.seq_len))
    ids = table[example_id, position]
    return np.array([f"tok{i}" for i in range(spec.vocab_size)], dtype=object)[ids]


def make_query_shard(spec: SyntheticSpec, layer: int, q_head: int) -> TokenArrays:
    truth = head_truth(spec, layer, q_head)
    ex, pos = example_layout(spec, 0, layer, q_head)
    bucket = pos // spec.bucket_size
    rng = _rng(spec, 4, layer, q_head)
    n, d = ex.size, spec.head_dim
    y = np.empty((n, d))
    y[:, 0] = truth.a + truth.b * pos / spec.seq_len + truth.sigma0 * rng.standard_normal(n)
    sem = rng.standard_normal((n, d - 1)) @ truth.mixing.T
    y[:, 1:] = truth.mu + truth.sigma * bucket_scale(bucket)[:, None] * sem
    return TokenArrays(
        bucket=bucket.astype(np.int64),
        example_id=ex.astype(np.int64),
        position=pos.astype(np.float64),
        vectors=y @ truth.basis.T,
        sliding_window=spec.sliding_windows.get(layer),
        token_str=token_strings(spec, ex, pos),
    )


def make_key_shard(spec: SyntheticSpec, layer: int, k_head: int) -> TokenArrays:
    ex, pos = example_layout(spec, 1, layer, k_head)
    bucket = pos // spec.bucket_size
    rng = _rng(spec, 5, layer, k_head)
    n, d = ex.size, spec.head_dim
    key_mean = rng.choice([-0.5, 0.5], size=d)
    vectors = key_mean + rng.standard_normal((n, d))
    return TokenArrays(
        bucket=bucket.astype(np.int64),
        example_id=ex.astype(np.int64),
        position=pos.astype(np.float64),
        vectors=vectors,
        sliding_window=spec.sliding_windows.get(layer),
        token_str=token_strings(spec, ex, pos),
    )


def _cell_pairs(example_id: np.ndarray, max_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All same-example distinct key pairs of one bucket, or a uniform sample of them."""
    firsts, seconds = [], []
    for e in np.unique(example_id):
        idx = np.flatnonzero(example_id == e)
        i, j = np.triu_indices(idx.size, k=1)
        firsts.append(idx[i])
        seconds.append(idx[j])
    if not firsts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    i1, i2 = np.concatenate(firsts), np.concatenate(seconds)
    if i1.size > max_pairs:
        pick = rng.choice(i1.size, size=max_pairs, replace=False)
        i1, i2 = i1[pick], i2[pick]
    return i1, i2


def true_head_plasticity(
    spec: SyntheticSpec, q: TokenArrays, k: TokenArrays, layer: int, q_head: int, max_pairs_per_cell: int = 4096
) -> float:
    """ap_overall of SPEC 2.8 evaluated with the head's true parameters.

    Mean over (up to `max_pairs_per_cell` sampled) same-example key pairs per
    eligible cell, mean over cells per query bucket, query-count weighted mean
    over query buckets. Eligibility re-implemented here on purpose (see module doc).
    """
    truth = head_truth(spec, layer, q_head)
    rng = _rng(spec, 6, layer, q_head)
    yk = k.vectors @ truth.basis  # key coordinates in the generating basis
    window = q.sliding_window
    k_buckets = np.unique(k.bucket)
    num, den = 0.0, 0.0
    for j in np.unique(q.bucket):
        in_j = q.bucket == j
        n_j = int(in_j.sum())
        if j <= 0 or n_j < 2:
            continue
        tau = q.position[in_j].mean()
        minpos_q = q.position[in_j].min()
        below = k_buckets[k_buckets < j]
        if below.size == 0:
            continue
        cells = []
        for c in below:
            maxpos_k = k.position[k.bucket == c].max()
            if window is None or c == below[-1] or maxpos_k >= minpos_q - window:
                cells.append(c)
        m0 = truth.a + truth.b * tau / spec.seq_len
        scale2 = truth.sigma**2 * bucket_scale(np.array([j]))[0] ** 2
        cell_values = []
        for c in cells:
            rows = np.flatnonzero(k.bucket == c)
            i1, i2 = _cell_pairs(k.example_id[rows], max_pairs_per_cell, rng)
            if i1.size == 0:
                continue
            diff = yk[rows[i1]] - yk[rows[i2]]
            m = diff[:, 0] * m0 + diff[:, 1:] @ truth.mu
            v = diff[:, 0] ** 2 * truth.sigma0**2 + scale2 * np.sum((diff[:, 1:] @ truth.mixing) ** 2, axis=1)
            p = ndtr(m / np.sqrt(np.where(v > 0, v, 1e-12)))
            cell_values.append(float(np.mean(4.0 * p * (1.0 - p))))
        if cell_values:
            num += n_j * float(np.mean(cell_values))
            den += n_j
    return num / den if den else float("nan")


# --------------------------------------------------------------------------- families of checkpoints


@dataclass(frozen=True)
class FamilySpec:
    """A family of synthetic checkpoints whose true plasticity drifts with the training step.

    Every checkpoint is `base` (same seed: the same head geometry, keys and sampling) with one change,
    the noise scale of query head ``h`` of layer ``l`` at step ``s``:

        sigma_{l,h}(s) = head_scales[h] * (s / steps[0]) ** layer_rates[l]

    so each layer's noise grows (rate > 0), stays (0) or shrinks (rate < 0) as a power of the step.
    A head's plasticity increases with its noise scale (more noise, a less predictable query), so the
    sign of a layer's rate is the direction its true AP moves in; the true AP of every head at every
    step is computed exactly by `true_head_plasticity`.
    """

    family: str = "synthetic-family"
    steps: tuple[int, ...] = (1000, 3000, 10000, 30000, 100000)
    stages: tuple[str, ...] | None = ("stage1", "stage1", "stage1", "stage2", "stage2")  # per step
    layer_rates: tuple[float, ...] = (0.25, 0.0, -0.25)
    head_scales: tuple[float, ...] = (0.2, 0.25, 0.3, 0.4)
    base: SyntheticSpec = field(default_factory=lambda: SyntheticSpec(
        model="synthetic-family", num_layers=3, num_q_heads=4, num_k_heads=2, head_dim=8, num_examples=8,
        seq_len=256, bucket_size=32, sliding_windows={}, seed=0))

    def __post_init__(self) -> None:
        if len(self.layer_rates) != self.base.num_layers:
            raise ValueError(f"layer_rates has {len(self.layer_rates)} values for {self.base.num_layers} layers")
        if len(self.head_scales) != self.base.num_q_heads:
            raise ValueError(f"head_scales has {len(self.head_scales)} values for {self.base.num_q_heads} query heads")
        if not self.steps or min(self.steps) <= 0 or list(self.steps) != sorted(set(self.steps)):
            raise ValueError("steps must be positive and strictly increasing")
        if self.stages is not None and len(self.stages) != len(self.steps):
            raise ValueError(f"stages has {len(self.stages)} values for {len(self.steps)} steps")

    def model(self, step: int) -> str:
        """The checkpoint's model name: ``<family>-step-<step>``."""
        return f"{self.family}-step-{int(step)}"

    def stage(self, step: int) -> str | None:
        return None if self.stages is None else self.stages[self.steps.index(step)]

    def noise_scales(self, step: int) -> tuple[tuple[float, ...], ...]:
        """sigma_{l,h}(step) of every layer and query head (the law above)."""
        ratio = float(step) / float(self.steps[0])
        return tuple(tuple(float(h * ratio**rate) for h in self.head_scales) for rate in self.layer_rates)

    def checkpoint(self, step: int) -> SyntheticSpec:
        """The synthetic model of one checkpoint."""
        from dataclasses import replace

        return replace(self.base, model=self.model(step), noise_scales=None, layer_noise_scales=self.noise_scales(step))

