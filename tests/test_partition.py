"""Partitions: nothing lost or duplicated, exact sizes, seeded, and skew that follows alpha."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.errors import ConfigError
from sdk.partition import FORMS, PartitionSpec, parse_partition, partition, partition_summary

LABELS = np.repeat(np.arange(10), 60)

SPECS = st.one_of(
    st.just(PartitionSpec("iid")),
    st.floats(0.01, 100).map(lambda a: PartitionSpec("dirichlet", alpha=a)),
    st.integers(1, 5).map(lambda k: PartitionSpec("shards", shards=k)),
)


def _check_parts(parts: list[np.ndarray], n_samples: int, clients: int, per_client: int | None) -> None:
    assert len(parts) == clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)  # never duplicated across clients
    assert flat.min() >= 0 and flat.max() < n_samples
    if per_client is None:
        assert np.array_equal(np.sort(flat), np.arange(n_samples))  # never lost
        assert all(len(p) > 0 for p in parts)
    else:
        assert all(len(p) == per_client for p in parts)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 7), min_size=1, max_size=300),
    st.integers(1, 15),
    SPECS,
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), st.integers(1, 40)),
)
def test_partition_properties(
    labels: list[int], clients: int, spec: PartitionSpec, seed: int, per_client: int | None
) -> None:
    y = np.array(labels, dtype=np.int64)
    needed = clients * (per_client or 1)
    if needed > len(y):
        with pytest.raises(ConfigError):
            partition(y, clients, spec, seed=seed, samples_per_client=per_client)
        return
    parts = partition(y, clients, spec, seed=seed, samples_per_client=per_client)
    _check_parts(parts, len(y), clients, per_client)
    again = partition(y, clients, spec, seed=seed, samples_per_client=per_client)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # seeded
    summary = partition_summary(y, parts, 8)
    assert summary.shape == (clients, 8) and summary.sum() == sum(len(p) for p in parts)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), SPECS, st.integers(0, 10_000), st.one_of(st.none(), st.integers(1, 50)))
def test_balanced_labels_properties(
    clients: int, spec: PartitionSpec, seed: int, per_client: int | None
) -> None:
    parts = partition(LABELS, clients, spec, seed=seed, samples_per_client=per_client)
    _check_parts(parts, len(LABELS), clients, per_client)


def test_iid_sizes_and_seeds() -> None:
    parts = partition(LABELS, 7, PartitionSpec("iid"), seed=0)
    assert sorted(len(p) for p in parts) == [85, 85, 86, 86, 86, 86, 86]  # near-equal split of 600
    other = partition(LABELS, 7, PartitionSpec("iid"), seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_whole_budget_used_exactly() -> None:
    # samples_per_client * clients == all samples: pools run dry and shortfalls must be re-allocated.
    for spec in ("iid", "dirichlet:0.05", "dirichlet:1", "shards:1", "shards:3"):
        parts = partition(LABELS, 12, parse_partition(spec), seed=3, samples_per_client=50)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
        assert all(len(p) == 50 for p in parts)


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    counts = partition_summary(labels, parts, classes).astype(float)
    p = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))
    return float(np.mean(-np.sum(p * logs, axis=1)))


@pytest.mark.parametrize("per_client", [None, 50])
def test_small_alpha_skews_more_than_large_alpha(per_client: int | None) -> None:
    def entropy(alpha: float) -> float:
        spec = PartitionSpec("dirichlet", alpha=alpha)
        return float(
            np.mean(
                [
                    _mean_entropy(
                        LABELS, partition(LABELS, 8, spec, seed=s, samples_per_client=per_client), 10
                    )
                    for s in range(5)
                ]
            )
        )

    skewed, flat = entropy(0.1), entropy(100.0)
    # Dir(0.1) over 10 classes puts most mass on one or two classes (entropy well under 1 nat);
    # Dir(100) is close to uniform (entropy close to log 10 = 2.30).
    assert skewed < flat - 0.8
    assert flat > 0.9 * np.log(10)


def test_shards_give_k_labels_per_client() -> None:
    for k in (1, 2, 3):
        parts = partition(LABELS, 5, PartitionSpec("shards", shards=k), seed=0, samples_per_client=40)
        assert all(len(np.unique(LABELS[p])) == k for p in parts)
    # 5 clients x 2 shards over 10 classes of 60: shards are single-label, and dealing prefers
    # labels a client lacks, so every client ends with exactly 2 labels.
    for seed in range(5):
        parts = partition(LABELS, 5, parse_partition("shards:2"), seed=seed)
        assert all(len(np.unique(LABELS[p])) == 2 and len(p) == 120 for p in parts)


def test_shards_with_fixed_size_balance_label_usage() -> None:
    parts = partition(LABELS, 10, parse_partition("shards:2"), seed=4, samples_per_client=20)
    summary = partition_summary(LABELS, parts, 10)
    assert np.all((summary > 0).sum(axis=1) == 2) and np.all(summary[summary > 0] == 10)
    assert np.all((summary > 0).sum(axis=0) == 2)  # 20 label slots over 10 labels: each used twice


def test_shards_fall_back_when_a_pool_runs_dry() -> None:
    y = np.array([0] * 5 + [1] * 100 + [2] * 100)
    parts = partition(y, 4, parse_partition("shards:1"), seed=0, samples_per_client=50)
    _check_parts(parts, len(y), 4, 50)
    # Class 0 cannot fill a share of 50, so it is skipped while bigger pools remain.
    assert all(len(np.unique(y[p])) == 1 for p in parts)


def test_dirichlet_never_leaves_a_client_empty() -> None:
    y = np.repeat(np.arange(3), 4)
    for seed in range(20):
        parts = partition(y, 12, PartitionSpec("dirichlet", alpha=0.01), seed=seed)
        assert all(len(p) == 1 for p in parts)


def test_parse_partition_forms() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" Dirichlet:0.5 ") == PartitionSpec("dirichlet", alpha=0.5)
    assert parse_partition("shards:2") == PartitionSpec("shards", shards=2)
    for text in ("iid", "dirichlet:0.5", "shards:2", "dirichlet:100"):
        assert str(parse_partition(text)) == text
    for bad in (
        "zipf:1",
        "",
        "dirichlet",
        "dirichlet:",
        "dirichlet:-1",
        "dirichlet:0",
        "dirichlet:nan",
        "dirichlet:inf",
        "shards:0",
        "shards:x",
        "shards:1.5",
        "iid:3",
        "iid:",
    ):
        with pytest.raises(ConfigError) as exc:
            parse_partition(bad)
        message = str(exc.value)
        assert FORMS in message and "\n" not in message and repr(bad) in message


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"PartitionSpec\.alpha"):
        PartitionSpec("dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match=r"PartitionSpec\.alpha"):
        PartitionSpec("dirichlet")
    with pytest.raises(ConfigError, match=r"PartitionSpec\.alpha"):
        PartitionSpec("iid", alpha=1.0)
    with pytest.raises(ConfigError, match=r"PartitionSpec\.shards"):
        PartitionSpec("shards", shards=0)
    with pytest.raises(ConfigError, match=r"PartitionSpec\.shards"):
        PartitionSpec("shards", shards=True)
    with pytest.raises(ConfigError, match=r"PartitionSpec\.kind"):
        PartitionSpec("random")


def test_bad_budgets_and_labels() -> None:
    with pytest.raises(ConfigError, match="needs 700 samples, but the data has only 600"):
        partition(LABELS, 7, PartitionSpec("iid"), seed=0, samples_per_client=100)
    with pytest.raises(ConfigError, match="samples_per_client"):
        partition(LABELS, 7, PartitionSpec("iid"), seed=0, samples_per_client=0)
    with pytest.raises(ConfigError, match="num_clients"):
        partition(LABELS, 0, PartitionSpec("iid"), seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        partition(np.array([0, 1]), 3, PartitionSpec("iid"), seed=0)
    with pytest.raises(ConfigError, match=">= 0"):
        partition(np.array([0, -1, 1]), 1, PartitionSpec("iid"), seed=0)
    with pytest.raises(ConfigError, match="integers"):
        partition(np.array([0.5, 1.0]), 1, PartitionSpec("iid"), seed=0)
    with pytest.raises(ConfigError, match="empty"):
        partition(np.array([], dtype=np.int64), 1, PartitionSpec("iid"), seed=0)


def test_partition_summary() -> None:
    y = np.array([0, 0, 1, 2, 2, 2])
    summary = partition_summary(y, [np.array([0, 3]), np.array([1, 2, 4, 5])], 4)
    assert summary.dtype == np.int64
    assert summary.tolist() == [[1, 0, 1, 0], [1, 1, 2, 0]]
    assert partition_summary(y, [], 3).shape == (0, 3)
    with pytest.raises(ConfigError, match="num_classes"):
        partition_summary(y, [np.array([0])], 2)
