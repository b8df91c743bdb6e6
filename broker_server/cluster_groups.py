"""Clusters of the fleet (``--clusters``): who belongs where, and each cluster's own module.

The algorithms (spherical k-means on label histograms, the shared-tensor step) are in
:mod:`broker_server.clustering`; this module keeps one run's clustering, stores it with the
state so that a restart keeps every device in its cluster, and does each cluster's aggregation and
evaluation over the joined state (every cluster's tensors under ``cluster{k}/`` names).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from broker_server.aggregation import ClientUpdate, State
from broker_server.clustering import (
    Clustering,
    cluster_clients,
    cluster_heads,
    clustered_step,
    join_states,
    nearest_cluster,
    split_state,
)
from broker_server.evaluation import ModelEvaluator
from broker_server.records import weighted
from broker_server.state import StateStore
from broker_server.strategies import Carry, StrategyRule
from edge_runtime import wire
from edge_runtime.engines.base import EvalResult
from edge_runtime.errors import ConfigError

log = logging.getLogger("fedpeft.server")


class ClusterGroups:
    """One run's clusters: formed once the expected devices said hello, then one module each."""

    def __init__(self, k: int | None, *, seed: int, share: float, store: StateStore | None) -> None:
        self.k_requested = k  # None: chosen by the silhouette ("auto")
        self.seed = seed
        self.share = share
        self.store = store
        self.clustering: Clustering | None = None
        self.base_shapes: dict[str, tuple[int, ...]] = {}  # one cluster's module
        self.shared: list[str] = []  # tensors the clusters shared in the last round
        self.by_cluster: dict[str, float] = {}  # the last evaluation's accuracy of each cluster

    def histogram(self, hello: wire.Hello) -> np.ndarray:
        """The device's label histogram over the module's classes."""
        classes = int(self.base_shapes["head.weight"][0])
        hist = np.zeros(classes)
        given = np.asarray(hello.label_histogram[:classes], dtype=np.float64)
        hist[: len(given)] = given
        return hist

    def form(self, state: Mapping[str, np.ndarray], able: Mapping[str, wire.Hello]) -> State:
        """Group the ``able`` devices by their label histograms; returns the joined state, every
        cluster starting from ``state``."""
        self.base_shapes = {n: tuple(v.shape) for n, v in state.items()}
        hists = {d: self.histogram(h) for d, h in able.items()}
        self.clustering = cluster_clients(hists, self.k_requested, seed=self.seed)
        self.save()
        log.info(
            "%d clusters of %s devices (silhouette %.2f)",
            self.clustering.k,
            self.clustering.sizes(),
            self.clustering.silhouette,
        )
        return join_states({c: dict(state) for c in range(self.clustering.k)})

    def restore(self, clustering: Clustering, state: Mapping[str, np.ndarray]) -> None:
        """Take back the clustering a run before a restart had formed (``state`` is joined)."""
        self.clustering = clustering
        first = split_state(state, len(clustering.centroids))[0]
        self.base_shapes = {n: tuple(v.shape) for n, v in first.items()}

    def member(self, device: str, hello: wire.Hello | None) -> int | None:
        """The device's cluster; a device that joins after clustering goes to the nearest one."""
        if self.clustering is None:
            return None
        cluster = self.clustering.members.get(device)
        if cluster is None and hello is not None:
            cluster = nearest_cluster(self.histogram(hello), self.clustering.centroids)
            self.clustering.members[device] = cluster
            self.save()
            log.info("device %s joins cluster %d", device, cluster)
        return cluster

    def save(self) -> None:
        """Keep the clustering in the state store (a restart keeps every device in its cluster)."""
        if self.store is None or self.clustering is None:
            return
        self.store.set_meta(
            "clusters",
            {
                "members": self.clustering.members,
                "centroids": self.clustering.centroids.tolist(),
                "silhouette": self.clustering.silhouette,
            },
        )

    def summary(self) -> dict[str, Any] | None:
        """Clusters for the report: how many, their sizes and the silhouette (None when off)."""
        if self.clustering is None:
            return None
        return {
            "k": self.clustering.k,
            "sizes": self.clustering.sizes(),
            "silhouette": self.clustering.silhouette,
            "share_cosine": self.share,
        }

    def _by_cluster(self, updates: Sequence[ClientUpdate]) -> dict[int, list[ClientUpdate]]:
        assert self.clustering is not None
        out: dict[int, list[ClientUpdate]] = {}
        for u in updates:
            out.setdefault(self.clustering.members[u.device_id], []).append(u)
        return out

    def heads(
        self,
        state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        head: Callable[[Sequence[ClientUpdate]], dict[str, np.ndarray]],
    ) -> State:
        """A statistics round: each cluster's class-mean head, blended with the fleet's."""
        assert self.clustering is not None
        states = split_state(state, self.clustering.k)
        by_cluster = self._by_cluster(updates)
        heads = cluster_heads(head(updates), {c: head(us) for c, us in by_cluster.items()}, self.clustering.k)
        self.shared = []
        return join_states({c: {**states[c], **heads[c]} for c in states})

    def around(self, inner: StrategyRule) -> StrategyRule:
        """``inner`` per cluster over the joined state: each cluster aggregates its own devices'
        updates from its own module, and tensors the clusters agree on are shared
        (:func:`~broker_server.clustering.clustered_step`). A wrapper like those of
        :mod:`broker_server.strategy_wrappers`, kept out of their registry because it needs this
        run's clustering, which exists only once the devices said hello. Rules that keep a carry
        are refused: one carry cannot follow several clusters' modules."""
        if inner.keeps_carry:
            raise ConfigError(f"--clusters works with the stateless rules, not {inner.name!r}")

        def per_cluster(state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
            return inner.aggregate(state, updates)[0]

        def step(
            state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
        ) -> tuple[State, Carry]:
            if self.clustering is None:
                raise ConfigError("the clusters are formed once the expected devices said hello")
            states = split_state(state, self.clustering.k)
            new, self.shared = clustered_step(states, self._by_cluster(updates), per_cluster, self.share)
            return join_states(new), {}

        return StrategyRule(f"clusters({inner.name})", step)

    def evaluate(self, state: Mapping[str, np.ndarray], evaluator: ModelEvaluator) -> EvalResult | None:
        """Each cluster's module on the test set; the mean weighted by the clusters' devices."""
        assert self.clustering is not None
        states = split_state(state, self.clustering.k)
        results: list[tuple[int, EvalResult]] = []
        by_cluster: dict[str, float] = {}
        for cluster, size in enumerate(self.clustering.sizes()):
            if size == 0:
                continue
            res = evaluator.evaluate(states[cluster])
            if res is None:
                self.by_cluster = {}
                return None
            results.append((size, res))
            by_cluster[str(cluster)] = res.accuracy
        self.by_cluster = by_cluster
        return weighted(results)
