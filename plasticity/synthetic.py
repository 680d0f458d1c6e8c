"""Synthetic sniffer data with known attention plasticity.

The generator draws, for every head, queries from exactly the model that the
`bucket_full_cov` estimator assumes (docs/method.md#attention-plasticity), written in a random orthonormal
basis ``B`` of R^d:

    y = B^T q,    y_0 = a + b * p / L + sigma0 * e_0           (positional axis)
                  y_s = mu + sigma * c_j * M e_s                (semantic axes, d-1)

with ``p`` the position, ``L`` the sequence length, ``c_j`` a per-bucket scale
and ``M`` a fixed mixing matrix, so the true semantic covariance of bucket j is
``Sigma_j = sigma^2 c_j^2 M M^T``. Keys are Gaussian around a fixed mean. The
noise scale ``sigma`` sets the plasticity: ``sigma -> 0`` makes the query
deterministic (AP -> 0), a zero mean with any noise gives AP = 1.

`true_head_plasticity` evaluates the attention-plasticity formula with these true
parameters over (a large sample of) all same-example key pairs. It is written
independently of `plasticity.estimators` (plain per-cell enumeration) so that
the estimator can be tested against it.

Everything here is pure: arrays in, arrays out. Writing Parquet lives in
`warehouse.sources.demo_data`.
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
    mixing_scale: float = 0.3  # M = I + mixing_scale * N(0, 1/(d-1)); 0 gives isotropic semantic noise
    noise_condition: float = 1.0  # ratio of the largest to the smallest semantic noise scale (M's columns)
    position_noise: float | None = None  # sigma0 of the positional axis; None: the head's noise scale
    token_keys: bool = False  # keys are a function of the token (see key_vocabulary) instead of i.i.d. noise
    layer_noise_scales: tuple[tuple[float, ...], ...] | None = None  # per layer, per q head (a family's checkpoint)
    vocab_size: int = 50
    seed: int = 0
    #: How the heads' noise scales (hence their plasticity) are laid out, see `head_noise_scale`: "grid" (a
    #: fixed log grid, every layer low and high heads, the seed changes only the noise); "random" (the
    #: seed draws each head's scale); "rising" / "falling" (the seed draws them around a level that
    #: rises / falls with depth: deep layers more / less plastic).
    structure: str = "grid"

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
    if spec.structure != "grid":
        return _drawn_noise_scale(spec, layer, q_head), False
    if layer == 0 and q_head == spec.num_q_heads - 1:
        return 1.0, True
    grid = np.logspace(-3, 1, n_heads)
    # interleave so every layer holds low and high plasticity heads
    order = (idx * 7) % n_heads
    return float(grid[order]), False


#: Drawn structures: log10 of the noise scale spans [LOG_SCALE_LOW, LOG_SCALE_HIGH] (AP from ~0 to ~1).
STRUCTURES = ("grid", "random", "rising", "falling")
LOG_SCALE_LOW, LOG_SCALE_HIGH = -3.0, 1.0
#: "rising" / "falling": each head within this many decades of its layer's level.
LAYER_SPREAD = 0.75


def _drawn_noise_scale(spec: SyntheticSpec, layer: int, q_head: int) -> float:
    """A head's noise scale drawn from the seed (its own stream, so one head's draw does not depend on the
    model's size): log-uniform over the whole range ("random"), or within LAYER_SPREAD decades of a level
    moving linearly with depth from the low to the high end ("rising") or back ("falling")."""
    if spec.structure not in STRUCTURES:
        raise ValueError(f"structure {spec.structure!r}: choose one of {', '.join(STRUCTURES)}")
    u = np.random.default_rng([spec.seed, 7, layer, q_head]).random()
    if spec.structure == "random":
        return float(10.0 ** (LOG_SCALE_LOW + u * (LOG_SCALE_HIGH - LOG_SCALE_LOW)))
    depth = (layer + 0.5) / spec.num_layers
    if spec.structure == "falling":
        depth = 1.0 - depth
    span = LOG_SCALE_HIGH - LOG_SCALE_LOW - 2 * LAYER_SPREAD
    level = LOG_SCALE_LOW + LAYER_SPREAD + depth * span
    return float(10.0 ** (level + (2 * u - 1) * LAYER_SPREAD))


def head_truth(spec: SyntheticSpec, layer: int, q_head: int) -> HeadTruth:
    d = spec.head_dim
    rng = _rng(spec, 1, layer, q_head)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sigma, pure = head_noise_scale(spec, layer, q_head)
    mu = rng.standard_normal(d - 1)
    mu /= max(np.linalg.norm(mu), 1e-12)
    mixing = np.eye(d - 1) + spec.mixing_scale * rng.standard_normal((d - 1, d - 1)) / np.sqrt(max(d - 1, 1))
    if spec.noise_condition != 1.0:
        cond = float(spec.noise_condition)
        mixing = mixing * np.geomspace(1.0 / np.sqrt(cond), np.sqrt(cond), d - 1)[None, :]
    sigma0 = sigma if spec.position_noise is None else float(spec.position_noise)
    if pure:
        return HeadTruth(layer, q_head, basis, 0.0, 0.0, sigma0, sigma, np.zeros(d - 1), mixing, True)
    return HeadTruth(layer, q_head, basis, 1.0, 2.0, sigma0, sigma, mu, mixing, False)


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


def token_ids(spec: SyntheticSpec, example_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Token id per (example, position), i.i.d. uniform over ``vocab_size``, shared by every head."""
    rng = _rng(spec, 3)
    table = rng.integers(0, spec.vocab_size, size=(spec.num_examples, spec.seq_len))
    return table[example_id, position]


def token_strings(spec: SyntheticSpec, example_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Token text per (example, position), shared by every head of the model."""
    return np.array([f"tok{i}" for i in range(spec.vocab_size)], dtype=object)[token_ids(spec, example_id, position)]


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


def key_vocabulary(spec: SyntheticSpec, layer: int, k_head: int) -> np.ndarray:
    """(vocab_size, d) key vector of every token for `SyntheticSpec.token_keys`: ``N(key_mean, I)`` each,
    with ``key_mean`` in {-0.5, 0.5}^d."""
    rng = _rng(spec, 7, layer, k_head)
    key_mean = rng.choice([-0.5, 0.5], size=spec.head_dim)
    return key_mean + rng.standard_normal((spec.vocab_size, spec.head_dim))


def make_key_shard(spec: SyntheticSpec, layer: int, k_head: int) -> TokenArrays:
    ex, pos = example_layout(spec, 1, layer, k_head)
    bucket = pos // spec.bucket_size
    if spec.token_keys:
        vectors = key_vocabulary(spec, layer, k_head)[token_ids(spec, ex, pos)]
    else:
        rng = _rng(spec, 5, layer, k_head)
        key_mean = rng.choice([-0.5, 0.5], size=spec.head_dim)
        vectors = key_mean + rng.standard_normal((ex.size, spec.head_dim))
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
    """ap_overall of the attention-plasticity formula evaluated with the head's true parameters.

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


def population_plasticity(
    spec: SyntheticSpec,
    layer: int,
    q_head: int,
    orientation: np.ndarray,
    estimator: str,
    q_bucket: np.ndarray,
    mean_position: np.ndarray,
    weight: np.ndarray,
) -> tuple[float, np.ndarray]:
    """The value ``estimator`` estimates on this head's data, exactly: the attention-plasticity formula with the generating
    parameters and the key population in place of samples (`SyntheticSpec.token_keys` only).
    Returns (ap_overall, AP_j per bucket).

    Every key is the vector of its token, tokens i.i.d. uniform over V = ``vocab_size``, so a
    same-example key difference is ``k_t - k_u`` for a uniform pair of tokens (t, u), and every cell
    of bucket j has the same value ``AP_j = V^-2 sum_{t,u} AP(k_t - k_u)`` (``t = u`` gives D = 0 and
    AP = 1, as the method's variance floor says). With ``q = B y`` (generating basis B), at the bucket's
    mean position ``tau_j``:

    * bucket_full_cov: the true model, ``mean_j = B (a + b tau_j / L, mu)``,
      ``C_j = B blockdiag(sigma0^2, sigma^2 c_j^2 M M^T) B^T``;
    * linear_diag: its own model's population parameters in the true rotated basis (orientation s,
      then the reflection taking the positional axis ``u = s * B e0`` to e1, `plasticity.rotation`):
      the same mean, and the diagonal of the pooled residual covariance
      ``blockdiag(sigma0^2, sigma^2 mean_p(c^2) M M^T)`` (every position equally likely).

    ``ap_overall`` weights the buckets by ``weight`` (query counts for bucket_full_cov, numbers of
    cells for linear_diag).
    """
    from plasticity.pair_ap import ap_from_moments
    from plasticity.rotation import householder_matrix

    if not spec.token_keys:
        raise ValueError("population_plasticity needs SyntheticSpec(token_keys=True): its key population is finite")
    truth = head_truth(spec, layer, q_head)
    d, L = spec.head_dim, spec.seq_len
    vocab = key_vocabulary(spec, layer, q_head // spec.group)
    D = (vocab[:, None, :] - vocab[None, :, :]).reshape(-1, d)  # every ordered token pair, raw basis
    mixing_gram = truth.mixing @ truth.mixing.T
    bucket = np.asarray(q_bucket, dtype=np.int64)
    means_y = np.zeros((bucket.shape[0], d))
    means_y[:, 0] = truth.a + truth.b * np.asarray(mean_position, dtype=np.float64) / L
    means_y[:, 1:] = truth.mu
    if estimator == "bucket_full_cov":
        Dy = D @ truth.basis  # generating coordinates
        m = Dy @ means_y.T
        sem = np.einsum("ij,jk,ik->i", Dy[:, 1:], mixing_gram, Dy[:, 1:])
        v = truth.sigma0**2 * Dy[:, :1] ** 2 + sem[:, None] * (truth.sigma**2 * bucket_scale(bucket) ** 2)[None, :]
    elif estimator == "linear_diag":
        s = np.asarray(orientation, dtype=np.float64)
        u = s * truth.basis[:, 0] * (np.sign(truth.b) if truth.b else 1.0)
        T = householder_matrix(u) @ (s[:, None] * truth.basis)  # y -> rotated oriented coordinates
        resid_cov = np.zeros((d, d))
        resid_cov[0, 0] = truth.sigma0**2
        resid_cov[1:, 1:] = truth.sigma**2 * np.mean(bucket_scale(np.arange(L) // spec.bucket_size) ** 2) * mixing_gram
        Drot = (D * s) @ householder_matrix(u)
        m = Drot @ (means_y @ T.T).T
        v = (Drot**2 @ np.diag(T @ resid_cov @ T.T))[:, None]
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    ap_j = ap_from_moments(m, np.broadcast_to(v, m.shape)).mean(axis=0)
    w = np.asarray(weight, dtype=np.float64)
    return float(np.sum(w * ap_j) / np.sum(w)), ap_j
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

