"""Clustered aggregation: grouping by label histograms, per-cluster modules, shared tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, fedit
from broker_server.clustering import (
    cluster_clients,
    cluster_heads,
    clustered_step,
    join_states,
    looks_homogeneous,
    nearest_cluster,
    parse_clusters,
    split_state,
)
from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.simulate import SimulationConfig
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


def _groups(rng: np.random.Generator, sizes: list[int], classes: int = 12) -> dict[str, np.ndarray]:
    """Label histograms of devices in groups that hold disjoint sets of classes."""
    per = classes // len(sizes)
    out = {}
    for g, size in enumerate(sizes):
        for i in range(size):
            hist = np.zeros(classes)
            hist[g * per : (g + 1) * per] = rng.integers(5, 40, size=per)
            out[f"g{g}-d{i}"] = hist
    return out


def test_auto_finds_groups_that_hold_different_classes() -> None:
    vectors = _groups(np.random.default_rng(0), [3, 4, 2])
    result = cluster_clients(vectors, None)
    assert result.k == 3 and result.silhouette > 0.5
    for g in range(3):
        assert len({result.members[d] for d in vectors if d.startswith(f"g{g}-")}) == 1
    assert sorted(result.sizes()) == [2, 3, 4]


def test_auto_keeps_one_cluster_for_iid_devices() -> None:
    rng = np.random.default_rng(1)
    vectors = {f"d{i}": rng.multinomial(150, np.full(20, 0.05)).astype(float) for i in range(8)}
    result = cluster_clients(vectors, None)
    assert result.k == 1 and set(result.members.values()) == {0}


def test_the_homogeneity_check_tells_sampling_noise_from_skew() -> None:
    rng = np.random.default_rng(5)
    for n, classes in ((150, 20), (30, 77)):
        iid = np.stack([rng.multinomial(n, np.full(classes, 1 / classes)) for _ in range(8)])
        assert looks_homogeneous(iid)
    for alpha in (0.1, 1.0):
        skewed = np.stack([rng.multinomial(150, rng.dirichlet(np.full(20, alpha))) for _ in range(8)])
        assert not looks_homogeneous(skewed)
    assert looks_homogeneous(np.array([[5, 0, 0]]))  # one device: nothing to tell apart


def test_a_given_k_is_used_and_capped_by_the_devices() -> None:
    vectors = _groups(np.random.default_rng(2), [2, 2, 2])
    assert cluster_clients(vectors, 2).k == 2
    assert cluster_clients({"a": [1.0, 0.0], "b": [0.0, 1.0]}, 5).k == 2
    assert cluster_clients(vectors, 1).sizes() == [6]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 4), min_size=2, max_size=4))
def test_device_order_does_not_change_the_clusters(seed: int, sizes: list[int]) -> None:
    vectors = _groups(np.random.default_rng(seed), sizes)
    shuffled = dict(
        sorted(vectors.items(), key=lambda kv: np.random.default_rng(seed + 1).random() + len(kv[0]))
    )
    reversed_ = dict(reversed(list(vectors.items())))
    a, b, c = (cluster_clients(v, None, seed=3) for v in (vectors, shuffled, reversed_))
    assert a.members == b.members == c.members
    np.testing.assert_allclose(a.centroids, c.centroids)


def test_the_readme_benchmark_fleet_keeps_its_two_clusters() -> None:
    # the label histograms of bench/results/personalization/dir0.1-clustered.json (20 Newsgroups,
    # Dirichlet(0.1), seed 0), whose "2 (5 + 3 devices)" the README quotes
    hists = [
        [36, 0, 26, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 25, 3, 0, 10, 0, 1, 12],
        [0, 0, 10, 0, 0, 0, 15, 28, 4, 0, 16, 0, 0, 1, 3, 34, 0, 0, 0, 9],
        [0, 0, 1, 39, 0, 30, 0, 0, 38, 0, 0, 7, 4, 0, 0, 0, 0, 0, 1, 0],
        [2, 2, 26, 6, 14, 0, 0, 0, 23, 0, 0, 0, 0, 0, 45, 0, 2, 0, 0, 0],
        [0, 0, 18, 0, 0, 0, 0, 0, 0, 0, 3, 0, 34, 2, 1, 0, 3, 9, 40, 10],
        [0, 0, 0, 2, 1, 0, 0, 0, 7, 15, 0, 8, 0, 8, 0, 0, 0, 27, 0, 52],
        [1, 1, 82, 0, 2, 1, 6, 1, 3, 0, 0, 21, 0, 0, 0, 0, 2, 0, 0, 0],
        [0, 4, 0, 0, 27, 0, 0, 0, 0, 0, 0, 0, 0, 0, 21, 0, 0, 63, 5, 0],
    ]
    result = cluster_clients({f"dev{i:03d}": h for i, h in enumerate(hists)}, None, seed=0)
    assert [result.members[f"dev{i:03d}"] for i in range(8)] == [0, 0, 0, 0, 1, 1, 0, 1]
    assert result.silhouette == pytest.approx(0.13335, abs=1e-4)


def test_identical_devices_are_never_split() -> None:
    # two equal starting centres end as one cluster: identical devices are not split to make up k
    result = cluster_clients({"a": [3.0, 1.0], "b": [3.0, 1.0], "c": [0.0, 2.0]}, 3)
    assert result.members == {"a": 0, "b": 0, "c": 1} and result.k == 2
    assert result.silhouette == pytest.approx(2 / 3)  # a and b score 1, c alone scores 0
    assert cluster_clients({d: [1.0, 1.0] for d in "abcd"}, 2).sizes() == [4]


def test_a_late_device_joins_the_nearest_cluster() -> None:
    result = cluster_clients(_groups(np.random.default_rng(4), [2, 2, 2]), 3)
    newcomer = np.zeros(12)
    newcomer[8:12] = [3, 9, 1, 4]  # the third group's classes
    assert nearest_cluster(newcomer, result.centroids) == result.members["g2-d0"]


def test_parse_clusters() -> None:
    assert parse_clusters("off") == 0 and parse_clusters("auto") is None and parse_clusters("3") == 3
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(ConfigError, match="--clusters"):
            parse_clusters(bad)


def _update(rng: np.random.Generator, name: str, n: int, shapes: dict[str, tuple[int, ...]]) -> ClientUpdate:
    return ClientUpdate(name, n, {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})


SHAPES = {"lora.A": (2, 5), "lora.B": (5, 2), "head.weight": (3, 5)}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 4))
def test_clustered_step_properties(seed: int, k: int, per: int) -> None:
    rng = np.random.default_rng(seed)
    start = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    states = {c: dict(start) for c in range(k)}
    updates = {
        c: [_update(rng, f"c{c}d{i}", int(rng.integers(1, 50)), SHAPES) for i in range(per)] for c in range(k)
    }
    every = [u for us in updates.values() for u in us]

    # nothing shared: each cluster is its own fedit
    apart, shared = clustered_step(states, updates, fedit, share_cosine=1.01)
    assert shared == []
    for c in range(k):
        expected = fedit(start, updates[c])
        for n in SHAPES:
            np.testing.assert_allclose(apart[c][n], expected[n], rtol=1e-5, atol=1e-6)

    # everything shared, from one start: fedit over the whole fleet, in every cluster
    together, shared = clustered_step(states, updates, fedit, share_cosine=-1.0)
    whole = fedit(start, every)
    assert shared == (sorted(SHAPES) if k > 1 else [])
    for c in range(k):
        for n in SHAPES:
            np.testing.assert_allclose(together[c][n], whole[n], rtol=1e-5, atol=1e-5)

    # client order within a cluster does not matter
    flipped = {c: list(reversed(us)) for c, us in updates.items()}
    again, _ = clustered_step(states, flipped, fedit, share_cosine=0.0)
    first, _ = clustered_step(states, updates, fedit, share_cosine=0.0)
    for c in range(k):
        for n in SHAPES:
            np.testing.assert_allclose(again[c][n], first[c][n], rtol=1e-5, atol=1e-6)

    # one client with weight 1 in a lone cluster returns its own module
    solo, _ = clustered_step({0: start}, {0: [updates[0][0]]}, fedit, share_cosine=0.0)
    for n in SHAPES:
        np.testing.assert_allclose(solo[0][n], start[n] + updates[0][0].delta[n], rtol=1e-5, atol=1e-6)

    # the inputs are left alone
    for c in range(k):
        for n in SHAPES:
            np.testing.assert_array_equal(states[c][n], start[n])


def test_only_tensors_whose_cluster_updates_agree_are_shared() -> None:
    start = {"body": np.zeros(4, np.float32), "head": np.zeros(4, np.float32)}
    same = np.array([1.0, 2.0, 0.0, 1.0], np.float32)
    updates = {
        0: [ClientUpdate("a", 30, {"body": same, "head": np.array([1, 0, 0, 0], np.float32)})],
        1: [ClientUpdate("b", 10, {"body": 2 * same, "head": np.array([0, 0, 0, 1], np.float32)})],
    }
    new, shared = clustered_step({0: start, 1: start}, updates, fedit, share_cosine=0.5)
    assert shared == ["body"]
    np.testing.assert_allclose(new[0]["body"], 0.75 * same + 0.25 * 2 * same)  # by samples
    np.testing.assert_allclose(new[1]["body"], new[0]["body"])
    np.testing.assert_allclose(new[0]["head"], [1, 0, 0, 0])
    np.testing.assert_allclose(new[1]["head"], [0, 0, 0, 1])
    # a cluster without updates keeps its module
    kept, _ = clustered_step({0: start, 1: start, 2: start}, updates, fedit, share_cosine=0.5)
    np.testing.assert_array_equal(kept[2]["body"], start["body"])


def test_cluster_heads_borrow_the_fleets_rows_for_classes_they_lack() -> None:
    fleet = {"head.weight": np.arange(6, dtype=np.float32).reshape(3, 2) + 1, "head.bias": np.zeros(3)}
    own = {"head.weight": np.array([[9, 9], [0, 0], [7, 7]], np.float32), "head.bias": np.zeros(3)}
    heads = cluster_heads(fleet, {0: own}, 2)
    np.testing.assert_array_equal(heads[0]["head.weight"], [[9, 9], [3, 4], [7, 7]])
    np.testing.assert_array_equal(heads[1]["head.weight"], fleet["head.weight"])  # no statistics


def test_split_and_join_are_inverse() -> None:
    states = {0: {"a": np.ones(2)}, 1: {"a": np.zeros(2)}}
    flat = join_states(states)
    assert set(flat) == {"cluster0/a", "cluster1/a"}
    back = split_state(flat, 2)
    np.testing.assert_array_equal(back[1]["a"], np.zeros(2))
    with pytest.raises(ConfigError):
        split_state({"a": np.ones(1)}, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clusters")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=24)


def _cfg(tiny: tuple[Path, Path]) -> TrainConfig:
    return TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LoraSpec(rank=2, alpha=4.0)
    )


def test_a_federation_keeps_one_module_per_cluster(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = load_folder(tiny[1])
    cfg = _cfg(tiny)
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="clu", rounds=2, train=cfg, min_clients=6, expected_clients=6, round_timeout_s=30,
        clusters="auto", personalize_epochs=1,
    )  # fmt: skip
    store = StateStore(tmp_path / "state.sqlite")
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0), store=store
    )
    service.start()
    agents = []
    for i in range(6):  # two devices for each class
        own = np.flatnonzero(train.labels == i // 2)
        half = own[(i % 2) :: 2]
        agent = DeviceAgent(
            f"d{i}",
            "clu",
            InMemoryTransport(broker, f"d{i}"),
            train.subset(half[:8]),
            lambda c: TorchEngine(c, seed=0, threads=1),
            holdout=train.subset(half[8:]),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    clustering = service.clustering
    assert clustering is not None and clustering.k == 3
    assert [clustering.members[f"d{i}"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    states = service.cluster_states()
    for agent in agents:  # every device ends on its own cluster's module
        assert agent.final_state is not None
        mine = states[clustering.members[agent.device_id]]
        for name, value in mine.items():
            np.testing.assert_array_equal(agent.final_state[name], value)
    # each cluster's head learned its own class: its class-mean row comes from its devices
    assert not np.allclose(states[0]["head.weight"], states[1]["head.weight"])
    train_rounds = [r for r in service.rounds if r["phase"] == "train"]
    assert len(train_rounds) == 2
    for record in train_rounds:
        assert set(record["accuracy_by_cluster"]) == {"0", "1", "2"}
        assert set(record["shared_tensors"]) <= set(states[0])
        assert record["participants"] == 6
    summary = service.cluster_summary()
    assert summary is not None and summary["sizes"] == [2, 2, 2]
    assert set(service.personalization) == {f"d{i}" for i in range(6)}

    # a restarted service finds the same clusters and the same modules in its state
    again = AggregationService(
        InMemoryTransport(InMemoryBroker(), "server2"), config, Evaluator(cfg, test, seed=0), store=store
    )
    assert again.restore() is not None
    assert again.clustering is not None and again.clustering.members == clustering.members
    for c, state in again.cluster_states().items():
        for name, value in state.items():
            np.testing.assert_array_equal(value, states[c][name])
    store.close()


def test_clusters_that_cannot_work_are_refused(tiny: tuple[Path, Path]) -> None:
    cfg = _cfg(tiny)
    with pytest.raises(ConfigError, match="--clusters"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, clusters="two")
    with pytest.raises(ConfigError, match="--clusters works with"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, clusters="auto", strategy="exact")
    with pytest.raises(ConfigError, match="cluster-share"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, clusters="2", cluster_share=3.0)
    with pytest.raises(ConfigError, match="--clusters"):
        SimulationConfig(data=str(tiny[1]), clusters="auto", profiles="low=0.5,high=0.5")
