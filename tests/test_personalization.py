"""Personalization: after the last round each device fine-tunes the global module on its own data
and measures both on its held-out samples; the personal module never leaves the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.cli import main as cli_main
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("personal")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=24)


def _federation(
    tiny: tuple[Path, Path], *, holdout: bool = True, personalize_epochs: int = 3, **service_kw: Any
) -> tuple[AggregationService, list[DeviceAgent]]:
    """Three devices, each holding one class only (the strongest label skew), one round."""
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, head_lr=5e-2,
        peft=LoraSpec(rank=2, alpha=4.0),
    )  # fmt: skip
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="personal",
        rounds=1,
        train=cfg,
        min_clients=3,
        expected_clients=3,
        round_timeout_s=30,
        head_init="random",
        personalize_epochs=personalize_epochs,
        **service_kw,
    )
    service = AggregationService(InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0))
    service.start()
    agents = []
    for label in range(3):
        own = np.flatnonzero(train.labels == label)
        data = train.subset(own[:16])
        held = train.subset(own[16:]) if holdout else None
        agent = DeviceAgent(
            f"d{label}",
            "personal",
            InMemoryTransport(broker, f"d{label}"),
            data,
            lambda c: TorchEngine(c, seed=0, threads=1),
            holdout=held,
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    return service, agents


def test_devices_fine_tune_the_final_module_and_report_both_accuracies(tiny: tuple[Path, Path]) -> None:
    service, agents = _federation(tiny)
    service.run()

    # the personalization phase is not a training round: no record, nothing aggregated
    assert [r["round"] for r in service.rounds] == [1]
    final = service.final_state()
    assert set(service.personalization) == {"d0", "d1", "d2"}
    for agent in agents:
        assert agent.done.is_set() and agent.final_state is not None  # "done" came after
        for k, v in final.items():  # the global module is untouched by the personal fine-tunes
            np.testing.assert_array_equal(agent.final_state[k], v)
        assert agent.personal_state is not None
        moved = [k for k in final if not np.array_equal(agent.personal_state[k], final[k])]
        assert "head.weight" in moved
        reported = service.personalization[agent.device_id]
        assert reported["holdout"] == 8.0 and reported["personal_epochs"] == 3.0
        assert 0 <= reported["prior_accuracy"] <= 1
        assert {k: reported[k] for k in agent.personalization} == pytest.approx(agent.personalization)
    # one class a device: its own fine-tune predicts it, the shared model of three skewed
    # devices does not (a random head after one round)
    own = [m["personalized_accuracy"] for m in service.personalization.values()]
    shared = [m["global_own_accuracy"] for m in service.personalization.values()]
    assert min(own) >= 0.99
    assert np.mean(shared) < 0.9
    summary = service.personalization_summary()
    assert summary["personalized_accuracy"] == pytest.approx(np.mean(own))
    assert summary["global_own_accuracy"] == pytest.approx(np.mean(shared))


def test_devices_without_held_out_samples_report_none(tiny: tuple[Path, Path]) -> None:
    service, agents = _federation(tiny, holdout=False)
    service.run()
    assert all(m["holdout"] == 0.0 for m in service.personalization.values())
    assert set(service.personalization_summary().values()) == {None}
    assert all(a.personal_state is None and a.done.is_set() for a in agents)


def test_impossible_personalization_figures_are_rejected_and_the_run_ends(tiny: tuple[Path, Path]) -> None:
    service, agents = _federation(tiny)

    def boasting(*_: Any) -> dict[str, float]:
        return {"holdout": 8.0, "global_own_accuracy": 0.5, "personalized_accuracy": 7.0}

    agents[0]._personalize = boasting  # type: ignore[method-assign]
    service.run()
    assert set(service.personalization) == {"d1", "d2"}
    assert [r["client"] for r in service.rejected] == ["d0"]
    assert "accuracies in [0, 1]" in service.rejected[0]["reason"]
    assert all(a.done.is_set() for a in agents)


def test_bad_personalization_settings_are_refused(tiny: tuple[Path, Path], capsys: Any) -> None:
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3)
    with pytest.raises(ConfigError, match="personalize-epochs"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, personalize_epochs=-1)
    with pytest.raises(ConfigError, match="holdout"):
        SimulationConfig(data=str(tiny[1]), personalize_epochs=1, holdout=1.5)
    argv = ["simulate", "--data", str(tiny[1]), "--personalize-epochs", "-2", "--report", "x.json"]
    assert cli_main(argv) != 0
    assert "personalize-epochs" in capsys.readouterr().err


def test_simulate_reports_clusters_and_personalized_and_global_accuracy_per_client(
    tiny: tuple[Path, Path],
) -> None:
    config = SimulationConfig(
        data=str(tiny[1]), model=str(tiny[0]), clients=3, rounds=1, partition="shards:1",
        samples_per_client=20, test_samples=30, seq_len=16, bits=8, workers=2, round_timeout_s=60.0,
        engine="torch", personalize_epochs=2, head_lr=5e-2, clusters="3",
    )  # fmt: skip
    report = Simulation(config).run()
    validate_report(report)
    clients = report["clients"]
    assert [c["holdout"] for c in clients] == [4, 4, 4]  # 20% of 20, out of training
    assert all(c["samples"] == 16 for c in clients)
    for c in clients:
        assert 0 <= c["global_own_accuracy"] <= 1 and 0 <= c["personalized_accuracy"] <= 1
        # every device's held-out samples are of its own classes only (one shard)
        assert np.count_nonzero(c["label_histogram"]) == 1
    final = report["final"]
    assert final["personalized_accuracy"] == pytest.approx(
        np.mean([c["personalized_accuracy"] for c in clients])
    )
    assert final["global_own_accuracy"] == pytest.approx(np.mean([c["global_own_accuracy"] for c in clients]))
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    # one class a device: three clusters of one device each
    assert sorted(c["cluster"] for c in clients) == [0, 1, 2]
    assert final["clusters"]["k"] == 3 and final["clusters"]["sizes"] == [1, 1, 1]
    assert set(report["rounds"][-1]["accuracy_by_cluster"]) == {"0", "1", "2"}


def test_the_edge_client_holds_out_its_folders_test_split(tiny: tuple[Path, Path]) -> None:
    from sdk.edge_client import EdgeClient

    client = EdgeClient("mqtt://127.0.0.1:1", fleet="f", device_id="d", data=tiny[1], engine="torch")
    assert isinstance(client.holdout, TextDataset)
    assert len(client.data) == 72 and len(client.holdout) == 30
    assert client.agent.holdout is client.holdout


def test_the_label_prior_bias_is_bayes_rule_for_the_devices_labels() -> None:
    from edge_runtime.agent import label_prior_bias

    bias = label_prior_bias(np.array([30, 10, 0, 0]))
    assert bias.sum() == pytest.approx(0.0, abs=1e-6)
    # log ratios of the Laplace-smoothed prior: (30+1)/(10+1) and (10+1)/(0+1)
    assert bias[0] - bias[1] == pytest.approx(np.log(31 / 11), rel=1e-5)
    assert bias[1] - bias[2] == pytest.approx(np.log(11), rel=1e-5)
    assert bias[2] == bias[3]
    # an undecided global classifier becomes the device's majority-class one
    assert int(np.argmax(np.zeros(4) + bias)) == 0
