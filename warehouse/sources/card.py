"""The dataset card (README.md beside the shards): what a capture says about itself.

Two formats are read:

* qk-sniffer's markdown (``saver/readme.py``): bullet lines ``- `key`: `value` `` under
  "Current Specialization Metadata", "Bucket Parameters" and "Additional Captured Metadata"
  (``model``, ``sampling_strategy`` all|uniform|log, ``sampling_bucket_size`` or
  ``sampling_min_bucket_size``, ``attention_scope``, the ``head_sampling_*`` keys, and whatever
  extra metadata the capture recorded, e.g. ``num_q_heads`` or
  ``sampler: UniformSampler(base_rate=8, bucket_size=64)``);
* YAML front matter (our synthetic datasets: ``model_name``, ``num_layers``, ``num_q_heads``,
  ``num_k_heads``, ``sampler``, ``bucket_type``, ``bucket_size``, ``capture_fraction``).

A card is untrusted input. It is read up to `CARD_MAX_BYTES`; YAML goes through a safe loader that
refuses aliases (no expansion blow-ups) and duplicate keys; every value is validated. A value that
is malformed, or that two keys state differently, becomes "unknown" (None) and a line in
`DatasetCard.problems`; nothing here raises on a bad card. The model name is kept as text only:
never a path, a key or code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

CARD_FILE = "README.md"
CARD_MAX_BYTES = 256 * 1024
MAX_MODEL_NAME_CHARS = 256
MAX_LAYOUT_COUNT = 1 << 16  # layers or heads a card may state (real models have a few hundred at most)
MAX_BUCKET_SIZE = 2**31 - 1  # stored as INTEGER
BUCKET_SCHEMES = ("uniform", "log")
SAMPLING_STRATEGIES = ("all", "uniform", "log")

# keys that state the same fact, in the order they are looked up (both formats)
_ALIASES = {
    "model_name": ("model", "model_name"),
    "num_layers": ("num_layers", "head_sampling_num_layers", "num_hidden_layers"),
    "num_q_heads": ("num_q_heads", "head_sampling_num_query_heads", "num_attention_heads"),
    "num_k_heads": ("num_k_heads", "head_sampling_num_key_heads", "num_key_value_heads"),
    "uniform_bucket_size": ("sampling_bucket_size",),
    "log_min_bucket_size": ("sampling_min_bucket_size",),
    "bucket_size": ("bucket_size",),
    "bucket_type": ("bucket_type",),
    "sampling_strategy": ("sampling_strategy",),
    "sampler": ("sampler",),
    "base_rate": ("sampler_base_rate", "base_rate"),
    "capture_fraction": ("capture_fraction",),
    "head_sampling": ("head_sampling_strategy",),
    "head_sampling_query_heads": ("head_sampling_selected_query_heads",),
    "attention_scope": ("attention_scope",),
}
_BULLET = re.compile(r"^\s*[-*]\s+`([A-Za-z0-9_.-]+)`\s*:\s*(.*?)\s*$")
_SAMPLER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$")
_SAMPLER_KINDS = {"AllSampler": "all", "UniformSampler": "uniform", "LogUniformSampler": "log"}
_UNKNOWN = ("", "unknown", "none", "null")


@dataclass(frozen=True)
class BucketScheme:
    """How a capture put positions into buckets (qk-sniffer's two schemes)."""

    kind: str  # uniform | log
    size: int  # uniform: the bucket width; log: the size of the smallest bucket

    @property
    def log_floor(self) -> int:
        """F of the log scheme: bucket = ``max(floor(log2(p + 1)), F)``, ``F = ceil(log2(size))`` (qk-sniffer)."""
        return int(math.ceil(math.log2(self.size))) if self.size > 1 else 0

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform buckets, bucket = floor(position / {self.size})"
        return f"log buckets, bucket = max(floor(log2(position + 1)), {self.log_floor})"


@dataclass(frozen=True)
class DatasetCard:
    """What the card states, validated; None = not stated, or stated in a way that cannot be trusted
    (then `problems` says why)."""

    path: str | None = None
    format: str = "absent"  # absent | markdown | front_matter | front_matter+markdown | unreadable
    model_name: str | None = None  # untrusted text
    num_layers: int | None = None
    num_q_heads: int | None = None
    num_k_heads: int | None = None
    sampling_strategy: str | None = None  # all | uniform | log (qk-sniffer's sampler kinds)
    bucket_scheme: str | None = None  # uniform: floor(p / size); log: max(floor(log2(p + 1)), log2(size))
    bucket_size: int | None = None  # uniform: bucket width; log: size of the smallest bucket (a power of 2)
    sampler_base_rate: float | None = None
    capture_fraction: float | None = None  # per-position capture probability stated as such (synthetic cards)
    head_sampling: str | None = None  # e.g. "random_query": a random subset of query heads was captured
    head_sampling_query_heads: int | None = None  # how many query heads that subset has
    attention_scope: str | None = None  # "full_only": sliding-window layers were not captured
    problems: tuple[str, ...] = field(default=())

    @property
    def has_layout(self) -> bool:
        return self.num_q_heads is not None and self.num_k_heads is not None

    @property
    def scheme(self) -> BucketScheme | None:
        """The bucket scheme when the card states it completely (kind and size), else None."""
        if self.bucket_scheme is None or self.bucket_size is None:
            return None
        return BucketScheme(self.bucket_scheme, self.bucket_size)

    def capture_probability(self, bucket) -> np.ndarray | None:
        """Probability that the capture kept a given position of a given bucket (queries and keys alike:
        qk-sniffer samples both with one sampler), or None when the card does not say.

        ``all``: 1. Uniform sampler: ``min(1, base_rate / bucket_size)``. Log-uniform sampler:
        ``min(1, base_rate / 2**max(bucket, F))`` (bucket ``b`` spans ``2**b`` positions). A card that
        states ``capture_fraction`` (our synthetic data): that fraction.
        """
        b = np.asarray(bucket, dtype=np.float64)
        constant = self.constant_capture_probability
        if constant is not None:
            return np.full(b.shape, constant)
        scheme = self.scheme
        if self.sampling_strategy == "log" and self.sampler_base_rate is not None and scheme is not None:
            width = np.power(2.0, np.maximum(b, float(scheme.log_floor)))
            return np.minimum(1.0, self.sampler_base_rate / width)
        return None

    @property
    def constant_capture_probability(self) -> float | None:
        """The capture probability when it is the same for every position (see `capture_probability`)."""
        if self.sampling_strategy == "all":
            return 1.0
        if self.capture_fraction is not None:
            return self.capture_fraction
        if self.sampling_strategy == "uniform" and self.sampler_base_rate is not None and self.bucket_size:
            return min(1.0, self.sampler_base_rate / self.bucket_size)
        return None


class CardConflict(ValueError):
    """Two different dataset cards could describe the same shards: the run stops, naming both."""


def find_card(root: str | Path, base: str | Path | None = None) -> Path | None:
    """The dataset card: ``README.md`` at the dataset root (a Hub branch's top level, the one card the
    Hub download fetches), or beside the shards (``base`` = root / model_dir, the folder a local copy
    of one model's capture usually is), or None. When both exist and differ, neither is guessed
    between: `CardConflict` names the two files."""
    found = []
    for folder in (Path(root), None if base is None else Path(base)):
        path = None if folder is None else folder / CARD_FILE
        if path is not None and path.is_file() and all(path.resolve() != f.resolve() for f in found):
            found.append(path)
    if len(found) == 2 and found[0].read_bytes() != found[1].read_bytes():
        raise CardConflict(f"two different dataset cards describe the shards in {base}: {found[0]} and "
                           f"{found[1]}; keep one of them (or make them identical)")
    return found[0] if found else None


def read_card(path: str | Path | None) -> DatasetCard:
    """Parse the card at `path` (None or missing: an empty card). Never raises on the card's content."""
    if path is None or not Path(path).is_file():
        return DatasetCard()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(CARD_MAX_BYTES + 1)
    except OSError as exc:
        return DatasetCard(path=str(path), format="unreadable",
                           problems=(f"cannot read the dataset card ({type(exc).__name__}: {exc})",))
    if len(raw) > CARD_MAX_BYTES:
        return DatasetCard(path=str(path), format="unreadable",
                           problems=(f"dataset card is larger than {CARD_MAX_BYTES} bytes; ignored",))
    return parse_card(raw.decode("utf-8", errors="replace"), str(path))


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (so no anchor can be expanded into a huge document) and
    duplicate mapping keys (which SafeLoader would silently resolve to the last one)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()
            raise yaml.composer.ComposerError(None, None, f"aliases are not allowed (found *{event.anchor})",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hashable = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "unhashable mapping key", key_node.start_mark)
            if hashable:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _front_matter(text: str) -> tuple[str | None, str]:
    """(front matter text or None, the rest)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1:])
    return None, text


def _scalar_text(value) -> str | None:
    """A YAML scalar as text; None for mappings, lists and nulls (never facts of this card)."""
    if value is None or isinstance(value, (dict, list, tuple, set)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _markdown_value(value: str) -> str:
    value = value.strip()
    m = re.fullmatch(r"`([^`]*)`", value)
    return m.group(1).strip() if m else value


def parse_card(text: str, path: str | None = None) -> DatasetCard:
    """Interpret a card's text (see the module docstring)."""
    problems: list[str] = []
    stated: dict[str, list[str]] = {}
    front, body = _front_matter(text)
    formats = []
    if front is not None:
        formats.append("front_matter")
        try:
            data = yaml.load(front, Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader subclass
        except Exception as exc:  # any YAML error (or a nesting too deep to compose): ignore the block
            problems.append(f"YAML front matter ignored: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            data = None
        if data is not None and not isinstance(data, dict):
            problems.append("YAML front matter ignored: not a mapping")
        elif isinstance(data, dict):
            for key, value in data.items():
                text_value = _scalar_text(value)
                if isinstance(key, str) and text_value is not None:
                    stated.setdefault(key, []).append(text_value)
    bullets = 0
    for line in body.splitlines():
        m = _BULLET.match(line)
        if m:
            bullets += 1
            stated.setdefault(m.group(1), []).append(_markdown_value(m.group(2)))
    if bullets:
        formats.append("markdown")
    fmt = "+".join(formats) if formats else "absent"
    return _interpret(stated, problems, path, fmt)


class _Reader:
    """Looks facts up under their aliases; conflicting or malformed values -> None + a problem."""

    def __init__(self, stated: dict[str, list[str]], problems: list[str]):
        self.stated, self.problems = stated, problems

    def text(self, fact: str) -> str | None:
        values = {}
        for key in _ALIASES[fact]:
            for v in self.stated.get(key, ()):
                if v.strip().lower() not in _UNKNOWN:
                    values.setdefault(v.strip(), key)
        if len(values) > 1:
            shown = ", ".join(f"{k}={v!r}" for v, k in values.items())
            self.problems.append(f"{fact}: the card states different values ({shown}); treated as unknown")
            return None
        return next(iter(values), None)

    def positive_int(self, fact: str, value: str | None = None, at_most: int = MAX_BUCKET_SIZE) -> int | None:
        value = self.text(fact) if value is None else value
        if value is None:
            return None
        if re.fullmatch(r"\+?[0-9]{1,12}(\.0*)?", value.strip()) and 0 < int(float(value)) <= at_most:
            return int(float(value))
        self.problems.append(f"{fact}: {value[:80]!r} is not a positive integer up to {at_most}; treated as unknown")
        return None

    def positive_float(self, fact: str, value: str | None = None, at_most: float | None = None) -> float | None:
        value = self.text(fact) if value is None else value
        if value is None:
            return None
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if math.isfinite(x) and x > 0 and (at_most is None or x <= at_most):
            return x
        bound = f" in (0, {at_most:g}]" if at_most is not None else ""
        self.problems.append(f"{fact}: {value[:80]!r} is not a positive number{bound}; treated as unknown")
        return None


def parse_sampler(text: str) -> tuple[str, dict[str, str]] | None:
    """``UniformSampler(base_rate=8, bucket_size=64)`` -> ("uniform", {"base_rate": "8", "bucket_size": "64"});
    a plain kind (``all``, ``uniform``, ``log``, ``log_uniform``) -> (kind, {}); anything else None."""
    plain = text.strip().lower()
    if plain in ("all", "uniform", "log", "log_uniform"):
        return ("log" if plain == "log_uniform" else plain), {}
    m = _SAMPLER.match(text)
    if not m or m.group(1) not in _SAMPLER_KINDS:
        return None
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in m.group(2).split(","))):
        name, eq, value = part.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            return None
        args[name.strip()] = value.strip().strip("'\"")
    return _SAMPLER_KINDS[m.group(1)], args


def _interpret(stated: dict[str, list[str]], problems: list[str], path: str | None, fmt: str) -> DatasetCard:
    r = _Reader(stated, problems)
    name = r.text("model_name")
    if name is not None and len(name) > MAX_MODEL_NAME_CHARS:
        problems.append(f"model name longer than {MAX_MODEL_NAME_CHARS} characters; treated as unknown")
        name = None

    num_layers = r.positive_int("num_layers", at_most=MAX_LAYOUT_COUNT)
    num_q = r.positive_int("num_q_heads", at_most=MAX_LAYOUT_COUNT)
    num_k = r.positive_int("num_k_heads", at_most=MAX_LAYOUT_COUNT)
    if (num_q is None) != (num_k is None):
        if num_q is not None or num_k is not None:
            problems.append("the card gives only one of the query/key head counts; layout treated as unknown")
        num_q = num_k = None
    elif num_q is not None and num_q % num_k:
        problems.append(f"{num_q} query heads are not a whole number of groups of {num_k} key heads; "
                        "layout treated as unknown")
        num_q = num_k = None

    # sampler kind: sampling_strategy, a sampler description, and (front matter) bucket_type must agree
    strategy = r.text("sampling_strategy")
    if strategy is not None:
        strategy = strategy.lower()
        if strategy not in SAMPLING_STRATEGIES:
            problems.append(f"sampling_strategy {strategy[:40]!r} is not one of {', '.join(SAMPLING_STRATEGIES)}; "
                            "treated as unknown")
            strategy = None
    sampler_text = r.text("sampler")
    sampler = parse_sampler(sampler_text) if sampler_text is not None else None
    if sampler_text is not None and sampler is None:
        problems.append(f"sampler {sampler_text[:80]!r} is not a sampler this parser knows; ignored")
    sampler_kind, sampler_args = sampler if sampler else (None, {})
    if strategy is not None and sampler_kind is not None and strategy != sampler_kind:
        problems.append(f"sampling_strategy {strategy!r} disagrees with sampler {sampler_text!r}; "
                        "sampling treated as unknown")
        strategy = sampler_kind = None
        sampler_args = {}
    strategy = strategy or sampler_kind

    scheme = {"all": "uniform", "uniform": "uniform", "log": "log"}.get(strategy or "")
    bucket_type = r.text("bucket_type")
    if bucket_type is not None:
        bucket_type = bucket_type.lower()
        if bucket_type not in BUCKET_SCHEMES:
            problems.append(f"bucket_type {bucket_type[:40]!r} is not one of {', '.join(BUCKET_SCHEMES)}; ignored")
        elif scheme is not None and bucket_type != scheme:
            problems.append(f"bucket_type {bucket_type!r} disagrees with sampling strategy {strategy!r}; "
                            "bucket scheme treated as unknown")
            scheme = None
            strategy = None
        else:
            scheme = bucket_type

    # bucket size: every statement of it for this scheme must agree
    sizes = {}
    candidates = {"uniform": (("uniform_bucket_size", None), ("bucket_size", None), ("sampler", "bucket_size")),
                  "log": (("log_min_bucket_size", None), ("bucket_size", None), ("sampler", "min_bucket_size"))}
    for fact, arg in candidates.get(scheme or "", ()):
        value = sampler_args.get(arg) if fact == "sampler" else r.text(fact)
        if value is not None:
            size = r.positive_int("bucket_size" if fact == "sampler" else fact, value)
            if size is not None:
                sizes[size] = fact if fact != "sampler" else f"sampler {arg}"
    bucket_size = None
    if len(sizes) > 1:
        problems.append(f"the card states different bucket sizes ({', '.join(f'{v}={k}' for k, v in sizes.items())}); "
                        "bucket scheme treated as unknown")
        scheme = None
    elif sizes:
        bucket_size = next(iter(sizes))
        if scheme == "log" and bucket_size & (bucket_size - 1):
            bucket_size = 1 << int(math.ceil(math.log2(bucket_size)))  # qk-sniffer rounds it up the same way
    elif scheme is not None:
        problems.append(f"bucket scheme {scheme!r} without a bucket size; treated as unknown")
        scheme = None

    base_rate = r.positive_float("base_rate")
    if sampler_args.get("base_rate") is not None:
        from_sampler = r.positive_float("base_rate", sampler_args["base_rate"])
        if base_rate is not None and from_sampler is not None and base_rate != from_sampler:
            problems.append(f"base rate {base_rate:g} disagrees with the sampler's {from_sampler:g}; treated as unknown")
            base_rate = None
        else:
            base_rate = base_rate if from_sampler is None else from_sampler
    capture = r.positive_float("capture_fraction", at_most=1.0)
    if strategy == "all" and capture is not None and capture != 1.0:
        problems.append(f"capture_fraction {capture:g} contradicts the 'all' sampler; treated as unknown")
        capture = None
    if (strategy == "uniform" and capture is not None and base_rate is not None and bucket_size
            and capture != min(1.0, base_rate / bucket_size)):
        problems.append(f"capture_fraction {capture:g} disagrees with the sampler's rate {base_rate:g} / {bucket_size}; "
                        "treated as unknown")
        capture = None
    if strategy == "log" and capture is not None:
        problems.append("capture_fraction contradicts the log-uniform sampler (its rate varies by bucket); ignored")
        capture = None

    head_sampling = r.text("head_sampling")
    return DatasetCard(
        path=path, format=fmt, model_name=name, num_layers=num_layers, num_q_heads=num_q, num_k_heads=num_k,
        sampling_strategy=strategy, bucket_scheme=scheme, bucket_size=bucket_size if scheme else None,
        sampler_base_rate=base_rate, capture_fraction=capture,
        head_sampling=head_sampling[:80] if head_sampling else None,
        head_sampling_query_heads=r.positive_int("head_sampling_query_heads", at_most=MAX_LAYOUT_COUNT**2),
        attention_scope=(r.text("attention_scope") or None), problems=tuple(problems),
    )
