"""Clustered aggregation: devices grouped by what their data looks like, one module per group.

Devices are grouped by the cosine similarity of their label histograms (sent in ``hello``) with
k-means on the L2-normalised histograms (scikit-learn's ``KMeans``); ``auto`` picks the number of
clusters by the mean cosine silhouette (``sklearn.metrics.silhouette_score``) after SciPy's
chi-square test of homogeneity (``scipy.stats.chi2_contingency``). Each cluster
keeps its own global module; a tensor whose per-cluster updates agree this round (every pair's
cosine at least ``share_cosine``) takes one shared, sample-weighted update in every cluster, so
clusters pool what they agree on (typically the LoRA body) and keep apart what they do not
(typically the head). Pure functions; the service does the I/O.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2_contingency
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from broker_server.aggregation import ClientUpdate, State, Strategy
from edge_runtime.errors import ConfigError

MIN_SILHOUETTE = 0.1
"""Below this mean silhouette, ``auto`` keeps one cluster: the fleet's data is not grouped."""

RESTARTS = 5
"""k-means runs per k, each from its own start; the one whose clusters are tightest in cosine wins."""

HOMOGENEITY_Z = 3.0
"""``auto`` keeps one cluster when the chi-square statistic of the devices' label counts is within
this many standard deviations of its mean under "every device draws from one distribution"."""


def looks_homogeneous(counts: np.ndarray) -> bool:
    """Whether label counts (devices x classes) are consistent with one shared label distribution.

    Pearson's chi-square test of homogeneity (the statistic and its degrees of freedom from
    ``scipy.stats.chi2_contingency``) with the normal approximation of its distribution:
    small samples of IID devices differ by chance (30 samples over 77 classes look as unlike each
    other as Dirichlet-skewed ones do in cosine), which this accounts for and raw cosines do not.
    """
    o = np.asarray(counts, dtype=np.float64)
    o = o[:, o.sum(axis=0) > 0]
    o = o[o.sum(axis=1) > 0]
    if o.shape[0] < 2 or o.shape[1] < 2:
        return True
    # no Yates correction: with one degree of freedom it would make the statistic smaller
    chi2, _, df, _ = chi2_contingency(o, correction=False)
    return (chi2 - df) / np.sqrt(2.0 * df) < HOMOGENEITY_Z


@dataclass(frozen=True)
class Clustering:
    """Cluster of every device, the unit centroids, and the mean silhouette (0 for one cluster)."""

    members: dict[str, int]
    centroids: np.ndarray
    silhouette: float

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    def sizes(self) -> list[int]:
        """Devices per cluster."""
        return [sum(1 for c in self.members.values() if c == k) for k in range(self.k)]


def parse_clusters(text: str) -> int | None:
    """``off`` -> 0, ``auto`` -> None, ``K`` -> K (at least 1)."""
    if text == "off":
        return 0
    if text == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(f"--clusters takes off, auto or a number of clusters >= 1, got {text!r}")
    return k


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    uniform = np.full(x.shape[1], 1.0 / np.sqrt(x.shape[1]))
    return np.where(norms > 0, x / np.maximum(norms, 1e-12), uniform)


def _cosine_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k starting centres among the unit rows: k-means++ with cosine distance (D, not D^2)."""
    n = len(x)
    centers = [x[int(rng.integers(n))]]
    for _ in range(1, k):
        dist = np.clip(1.0 - np.max(x @ np.stack(centers).T, axis=1), 0.0, None)
        total = float(dist.sum())
        pick = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=dist / total))
        centers.append(x[pick])
    return np.stack(centers)


def _cosine_score(x: np.ndarray, labels: np.ndarray) -> float:
    """Sum over the unit rows of the cosine to their cluster's mean direction."""
    centroids = _unit_rows(np.stack([x[labels == j].sum(axis=0) for j in np.unique(labels)]))
    return float(np.sum(np.max(x @ centroids.T, axis=1)))


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Assignments of unit rows to at most k clusters: scikit-learn's k-means from each of
    :data:`RESTARTS` starts, the run whose clusters are tightest in cosine kept.

    On unit rows squared Euclidean distance is 2 - 2 cos, so k-means groups by cosine; spherical
    k-means would also renormalise the centroids between steps. The starts are this module's
    cosine k-means++ (seeded from ``seed``, k and the restart), not scikit-learn's (squared
    distances, greedy trials): with them nearly every fleet keeps the clusters of the spherical
    k-means used before (the benchmark fleets of the README among them), where scikit-learn's own
    starts changed about half. Fewer than k distinct rows may give fewer than k clusters;
    scikit-learn's warning about that is expected here.
    """
    best, best_score = np.zeros(len(x), dtype=np.int64), -np.inf
    for restart in range(RESTARTS):
        init = _cosine_plus_plus(x, k, np.random.default_rng([seed, k, restart]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = KMeans(n_clusters=k, init=init, n_init=1, random_state=0)
            labels = np.asarray(model.fit_predict(x), dtype=np.int64)
        score = _cosine_score(x, labels)
        if score > best_score + 1e-12:
            best, best_score = labels, score
    return best


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance (a point alone in its cluster scores 0); 0 when it is
    undefined (one cluster, or every device alone)."""
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return 0.0
    return float(silhouette_score(x, labels, metric="cosine"))


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in order of their first member, so results do not depend on seeds' labels."""
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return np.array([order[int(label)] for label in labels])


def cluster_clients(
    vectors: Mapping[str, Sequence[float] | np.ndarray], k: int | None, *, seed: int = 0, max_k: int = 8
) -> Clustering:
    """Group devices by the cosine similarity of their vectors (label histograms, say).

    ``k`` None chooses k in 2..max_k by the mean silhouette, and 1 when the vectors (label counts)
    look drawn from one distribution (:func:`looks_homogeneous`) or no k reaches
    :data:`MIN_SILHOUETTE`. Devices are taken in sorted id order and clusters are numbered by their
    first device, so the result does not depend on the order of ``vectors``.
    """
    ids = sorted(vectors)
    if not ids:
        raise ConfigError("no devices to cluster")
    x = _unit_rows(np.stack([np.asarray(vectors[i], dtype=np.float64) for i in ids]))
    n = len(ids)
    if k is not None and k < 1:
        raise ConfigError(f"the number of clusters must be at least 1, got {k}")

    raw = np.stack([np.asarray(vectors[i], dtype=np.float64) for i in ids])
    if k is None:
        labels, silhouette = np.zeros(n, dtype=np.int64), 0.0
        homogeneous = looks_homogeneous(raw) if np.all(raw >= 0) else False
        for kk in range(2, 1 if homogeneous else min(max_k, n - 1) + 1):
            candidate = _canonical(_kmeans(x, kk, seed))
            score = _silhouette(x, candidate)
            if score > silhouette + 1e-12 and score >= MIN_SILHOUETTE:
                labels, silhouette = candidate, score
    else:
        kk = min(k, n)
        labels = _canonical(_kmeans(x, kk, seed)) if kk > 1 else np.zeros(n, dtype=np.int64)
        silhouette = _silhouette(x, labels)
    kk = int(np.max(labels)) + 1  # np.max: numpy 2.5's stubs reject ndarray.max() here
    centroids = _unit_rows(np.stack([x[labels == j].sum(axis=0) for j in range(kk)]))
    return Clustering({i: int(c) for i, c in zip(ids, labels, strict=True)}, centroids, silhouette)


def nearest_cluster(vector: Sequence[float] | np.ndarray, centroids: np.ndarray) -> int:
    """The cluster whose centroid is closest in cosine (a device that joins after clustering)."""
    x = _unit_rows(np.asarray(vector, dtype=np.float64)[None, :])
    return int(np.argmax(x @ np.asarray(centroids, dtype=np.float64).T, axis=1)[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a.ravel() @ b.ravel()) / (na * nb)


def clustered_step(
    states: Mapping[int, Mapping[str, np.ndarray]],
    updates: Mapping[int, Sequence[ClientUpdate]],
    rule: Strategy,
    share_cosine: float,
) -> tuple[dict[int, State], list[str]]:
    """One round of clustered aggregation; the new state of every cluster and the shared tensors.

    Each cluster with updates aggregates its own with ``rule``. Then, for each tensor, if every
    pair of those clusters' updates has cosine at least ``share_cosine``, every such cluster takes
    the sample-weighted mean of the clusters' updates instead (with fedit and equal starting
    states, sharing every tensor gives exactly fedit over the whole fleet). Clusters without
    updates keep their state.
    """
    new: dict[int, State] = {c: {k: np.array(v) for k, v in s.items()} for c, s in states.items()}
    active = sorted(c for c in states if updates.get(c))
    for c in active:
        new[c] = rule(states[c], updates[c])
    if len(active) < 2:
        return new, []
    samples = np.array([sum(max(u.num_samples, 0) for u in updates[c]) for c in active], dtype=np.float64)
    weights = samples / samples.sum() if samples.sum() > 0 else np.full(len(active), 1.0 / len(active))
    shared = []
    for name in sorted(states[active[0]]):
        deltas = [
            np.asarray(new[c][name], dtype=np.float64) - np.asarray(states[c][name], dtype=np.float64)
            for c in active
        ]
        agree = all(
            _cosine(deltas[i], deltas[j]) >= share_cosine
            for i in range(len(active))
            for j in range(i + 1, len(active))
        )
        if not agree:
            continue
        common = sum(w * d for w, d in zip(weights, deltas, strict=True))
        for c in active:
            new[c][name] = (np.asarray(states[c][name], dtype=np.float64) + common).astype(np.float32)
        shared.append(name)
    return new, shared


def cluster_heads(
    fleet_head: Mapping[str, np.ndarray], cluster_head: Mapping[int, Mapping[str, np.ndarray]], k: int
) -> dict[int, State]:
    """Each cluster's class-mean head, with the fleet's rows for classes its devices do not hold
    (zero rows), so a cluster's model still knows every class; clusters without statistics take
    the fleet's head."""
    out: dict[int, State] = {}
    for c in range(k):
        head = cluster_head.get(c)
        if head is None:
            out[c] = {n: np.array(v) for n, v in fleet_head.items()}
            continue
        weight = np.array(head["head.weight"])
        missing = np.linalg.norm(weight, axis=1) == 0
        weight[missing] = np.asarray(fleet_head["head.weight"])[missing]
        out[c] = {"head.weight": weight, "head.bias": np.array(head["head.bias"])}
    return out


def prefixed(cluster: int, name: str) -> str:
    """The name of a cluster's tensor in the service's one flat (checkpointed) state."""
    return f"cluster{cluster}/{name}"


def split_state(state: Mapping[str, np.ndarray], k: int) -> dict[int, State]:
    """The flat state's per-cluster modules."""
    out: dict[int, State] = {c: {} for c in range(k)}
    for key, value in state.items():
        head, sep, name = key.partition("/")
        if not sep or not head.startswith("cluster"):
            raise ConfigError(f"{key!r} is not a cluster tensor")
        out[int(head[len("cluster") :])][name] = value
    return out


def join_states(states: Mapping[int, Mapping[str, np.ndarray]]) -> State:
    """The inverse of :func:`split_state`."""
    return {prefixed(c, n): v for c in sorted(states) for n, v in states[c].items()}
