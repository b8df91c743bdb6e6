"""Seeded partitions of a labelled dataset across clients: iid, Dirichlet label skew, shards.

Two regimes:

* ``samples_per_client=None``: every sample goes to exactly one client (the union of the parts is
  the whole dataset) and no client is empty.
* ``samples_per_client=N``: every client gets exactly N samples, drawn without replacement, so the
  data budget is the same whatever the skew; this is how small-device experiments are run.

Every function is deterministic for a given seed; the parts are disjoint, sorted int64 index arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import ConfigError

KINDS = ("iid", "dirichlet", "shards")
FORMS = "iid, dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5), or shards:K with K >= 1 (e.g. shards:2)"

# Re-draws of the Dirichlet proportions before an empty client is fixed up by hand. Re-drawing is
# the usual practice; the cap keeps tiny alphas with many clients from looping for long.
_DIRICHLET_REDRAWS = 20


@dataclass(frozen=True)
class PartitionSpec:
    """How to split data across clients: ``iid``, ``dirichlet`` (needs alpha) or ``shards`` (needs shards)."""

    kind: str
    alpha: float | None = None
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"PartitionSpec.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "dirichlet":
            a = self.alpha
            if (
                isinstance(a, bool)
                or not isinstance(a, (int, float, np.integer, np.floating))
                or not (math.isfinite(a) and a > 0)
            ):
                raise ConfigError(f"PartitionSpec.alpha must be a finite number > 0; got {a!r}")
        elif self.alpha is not None:
            raise ConfigError(f"PartitionSpec.alpha applies only to kind 'dirichlet', not {self.kind!r}")
        if self.kind == "shards":
            k = self.shards
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ConfigError(f"PartitionSpec.shards must be an integer >= 1; got {k!r}")
        elif self.shards is not None:
            raise ConfigError(f"PartitionSpec.shards applies only to kind 'shards', not {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return "iid"


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K``."""
    kind, sep, arg = text.strip().lower().partition(":")
    arg = arg.strip()
    try:
        if kind == "iid" and not sep:
            return PartitionSpec("iid")
        if kind == "dirichlet" and arg:
            return PartitionSpec("dirichlet", alpha=float(arg))
        if kind == "shards" and arg:
            return PartitionSpec("shards", shards=int(arg))
    except ValueError:  # float()/int() failures and ConfigError (a ValueError) alike
        pass
    raise ConfigError(f"bad partition {text!r}; use {FORMS}")


def partition(
    labels: np.ndarray,
    num_clients: int,
    spec: PartitionSpec,
    *,
    seed: int,
    samples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Disjoint sorted int64 index arrays, one per client (see the module docstring for the regimes)."""
    y = _check_labels(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1; got {num_clients!r}")
    n = int(num_clients)
    rng = np.random.default_rng(seed)
    if samples_per_client is None:
        if n > len(y):
            raise ConfigError(f"{n} clients but only {len(y)} samples: every client needs at least one")
        if spec.kind == "iid":
            parts = np.array_split(rng.permutation(len(y)), n)
        elif spec.kind == "dirichlet":
            assert spec.alpha is not None
            parts = _dirichlet_all(y, n, spec.alpha, rng)
        else:
            assert spec.shards is not None
            parts = _shards_all(y, n, int(spec.shards), rng)
    else:
        size = samples_per_client
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"samples_per_client must be an integer >= 1 or None; got {size!r}")
        size = int(size)
        if size * n > len(y):
            raise ConfigError(
                f"{n} clients x {size} samples per client needs {n * size} samples, "
                f"but the data has only {len(y)}"
            )
        if spec.kind == "iid":
            parts = list(rng.permutation(len(y))[: n * size].reshape(n, size))
        elif spec.kind == "dirichlet":
            assert spec.alpha is not None
            parts = _dirichlet_fixed(y, n, size, spec.alpha, rng)
        else:
            assert spec.shards is not None
            parts = _shards_fixed(y, n, size, int(spec.shards), rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Clients x classes sample counts (int64), for reports and plots."""
    y = _check_labels(labels, allow_empty=True)
    if len(y) and y.max() >= num_classes:
        raise ConfigError(f"labels go up to {y.max()} but num_classes is {num_classes}")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    return out


# --- helpers ------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, *, allow_empty: bool = False) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array; got shape {y.shape}")
    if len(y) == 0:
        if allow_empty:
            return y.astype(np.int64)
        raise ConfigError("labels are empty: there is nothing to partition")
    if y.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integers; got dtype {y.dtype}")
    if y.min() < 0:
        raise ConfigError(f"labels must be >= 0; got {y.min()}")
    return y.astype(np.int64)


def _class_pools(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The classes present and, for each, its sample indices in a seeded random order."""
    classes = np.unique(y)
    return classes, [rng.permutation(np.flatnonzero(y == c)) for c in classes]


def _dirichlet(alpha: float, k: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(q)) or q.sum() <= 0:  # underflow guard for very small alpha
        q = np.zeros(k)
        q[rng.integers(k)] = 1.0
    return q


def _dirichlet_all(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, proportions across clients ~ Dir(alpha): the label skew of Hsu et al. (2019)."""
    _classes, pools = _class_pools(y, rng)
    chunks: list[list[np.ndarray]] = []
    for _attempt in range(_DIRICHLET_REDRAWS):
        chunks = [[] for _ in range(n)]
        for pool in pools:
            props = _dirichlet(alpha, n, rng)
            cuts = (np.cumsum(props)[:-1] * len(pool)).astype(np.int64)
            for client, chunk in enumerate(np.split(pool, cuts)):
                chunks[client].append(chunk)
        if all(sum(len(c) for c in cs) for cs in chunks):
            break
    parts = [np.concatenate(cs) for cs in chunks]
    # Still an empty client after the re-draws (tiny alpha, many clients): give it one sample from
    # the largest client, which changes that client's mix the least.
    for i in range(n):
        if len(parts[i]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _shards_all(y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into n*k shards, deal k to each client, preferring labels it lacks."""
    order = rng.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]  # by label, random within a label
    shards = np.array_split(order, n * k)
    shard_labels = [frozenset(np.unique(y[s]).tolist()) for s in shards]
    # Shuffled, then non-empty shards first (stable): there are at least n of them, so the first
    # pass gives every client a sample even when n*k exceeds the number of samples.
    remaining = sorted(rng.permutation(len(shards)).tolist(), key=lambda s: len(shards[s]) == 0)
    held: list[set[int]] = [set() for _ in range(n)]
    dealt: list[list[np.ndarray]] = [[] for _ in range(n)]
    for _round in range(k):
        for client in rng.permutation(n).tolist():
            pick = next((i for i, s in enumerate(remaining) if not shard_labels[s] & held[client]), 0)
            shard = remaining.pop(pick)
            held[client] |= shard_labels[shard]
            dealt[client].append(shards[shard])
    return [np.concatenate(d) for d in dealt]


def _top_up(
    got: np.ndarray,
    avail: np.ndarray,
    short: int,
    preferred: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Add ``short`` samples to ``got`` (in place) from classes with samples left.

    Classes with weight in ``preferred`` (those the client already has) come first, in proportion to
    their weight; only when they are all exhausted do other classes give, in proportion to what
    they have left. Each pass either finishes or exhausts a class, so it ends.
    """
    while short > 0:
        left = avail - got
        w = preferred * (left > 0)
        if w.sum() <= 0:
            w = left.astype(float)
        extra = np.minimum(rng.multinomial(short, w / w.sum()), left)
        got += extra
        short -= int(extra.sum())


def _take(pools: list[np.ndarray], used: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Pop ``got[c]`` indices off the front of each class pool."""
    taken = []
    for c in np.flatnonzero(got):
        taken.append(pools[c][used[c] : used[c] + got[c]])
        used[c] += got[c]
    return np.concatenate(taken)


def _dirichlet_fixed(
    y: np.ndarray, n: int, size: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client: mix q ~ Dir(alpha), counts ~ Multinomial(size, q), shortfalls topped up."""
    _classes, pools = _class_pools(y, rng)
    avail = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros_like(avail)
    parts = []
    for _ in range(n):
        q = _dirichlet(alpha, len(pools), rng)
        got = np.minimum(rng.multinomial(size, q), avail - used)
        _top_up(got, avail - used, size - int(got.sum()), q * (got > 0), rng)
        parts.append(_take(pools, used, got))
    return parts


def _shards_fixed(y: np.ndarray, n: int, size: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client: k distinct labels, the least used so far, with ``size`` split evenly among them."""
    _classes, pools = _class_pools(y, rng)
    num = len(pools)
    k = min(k, num)
    avail = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros_like(avail)
    usage = np.zeros(num, dtype=np.int64)
    share = -(-size // k)
    parts = []
    for _ in range(n):
        left = avail - used
        # lexsort's last key is the primary one: classes with samples first, then classes that can
        # fill a whole share (so the client keeps exactly k labels), then least used, then at random.
        chosen = np.lexsort((rng.random(num), usage, left < share, left == 0))[:k]
        want = np.zeros(num, dtype=np.int64)
        want[chosen] = size // k
        want[rng.permutation(chosen)[: size % k]] += 1
        usage[chosen] += 1
        got = np.minimum(want, left)
        _top_up(got, left, size - int(got.sum()), (want > 0).astype(float), rng)
        parts.append(_take(pools, used, got))
    return parts
