"""ORT training artifacts over MQTT: pack, chunk, reassemble in any order, verify, unpack safely, train."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.artifact_transfer import (
    MIN_CHUNK_BYTES,
    ArtifactAssembler,
    ArtifactInfo,
    cached_folder,
    chunk_overhead,
    iter_chunks,
    pack_bytes,
    unpack,
)
from edge_runtime.engines import device_engines
from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available
from edge_runtime.errors import ConfigError, MalformedPayload, PayloadTooLarge, UpdateRejected

KEY = "abc123def456"


def _chunks(payload: bytes, chunk_bytes: int, key: str = KEY) -> tuple[ArtifactInfo, list[bytes]]:
    info, chunks = iter_chunks(key, payload, chunk_bytes=chunk_bytes)
    return info, list(chunks)


payloads = st.binary(min_size=1, max_size=6000)
chunk_sizes = st.integers(min_value=MIN_CHUNK_BYTES, max_value=3000)


@settings(max_examples=80, deadline=None)
@given(payloads, chunk_sizes, st.data())
def test_chunks_reassemble_in_any_order_with_duplicates(
    payload: bytes, chunk_bytes: int, data: st.DataObject
) -> None:
    info, chunks = _chunks(payload, chunk_bytes)
    assert info.size == len(payload) and info.chunks == len(chunks)
    assert all(len(c) <= chunk_bytes for c in chunks)
    order = data.draw(st.permutations(range(len(chunks))))
    extra = data.draw(st.lists(st.sampled_from(order[:-1]), max_size=4)) if len(chunks) > 1 else []
    sequence = list(order[:-1]) + extra + [order[-1]]  # duplicates before the last new chunk
    assembler = ArtifactAssembler(KEY, expected=info)
    results = [assembler.add(chunks[i]) for i in sequence]
    assert results[-1] is True and not any(results[:-1])
    assert assembler.payload().read() == payload
    assert assembler.add(chunks[0]) is True  # a redelivery after completion changes nothing
    assembler.close()


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=2500, max_size=6000), st.data())
def test_a_missing_chunk_never_completes(payload: bytes, data: st.DataObject) -> None:
    _, chunks = _chunks(payload, MIN_CHUNK_BYTES)
    missing = data.draw(st.integers(0, len(chunks) - 1))
    rest = [c for i, c in enumerate(chunks) if i != missing]
    sequence = data.draw(st.permutations(rest)) + data.draw(st.lists(st.sampled_from(rest), max_size=5))
    assembler = ArtifactAssembler(KEY)
    assert not any(assembler.add(c) for c in sequence)
    with pytest.raises(MalformedPayload):
        assembler.payload()


@settings(max_examples=120, deadline=None)
@given(payloads, chunk_sizes, st.data())
def test_a_tampered_chunk_never_yields_a_wrong_payload(
    payload: bytes, chunk_bytes: int, data: st.DataObject
) -> None:
    _, chunks = _chunks(payload, chunk_bytes)
    which = data.draw(st.integers(0, len(chunks) - 1))
    pos = data.draw(st.integers(0, len(chunks[which]) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(chunks[which])
    bad[pos] ^= flip
    chunks[which] = bytes(bad)
    assembler = ArtifactAssembler(KEY)
    try:
        done = [assembler.add(c) for c in chunks]
    except UpdateRejected:
        return
    # the tamper hit a field that made the chunk a valid-looking duplicate: never complete
    assert not done[-1] or assembler.payload().read() == payload


def test_tampered_data_is_caught_by_the_hash() -> None:
    payload = os.urandom(5000)
    _, chunks = _chunks(payload, MIN_CHUNK_BYTES)
    bad = bytearray(chunks[1])
    bad[-1] ^= 1
    assembler = ArtifactAssembler(KEY)
    with pytest.raises(MalformedPayload, match="SHA-256"):
        for c in [chunks[0], bytes(bad), *chunks[2:]]:
            assembler.add(c)
    # a later, good copy of the chunk (a redelivery) still completes the pack
    assert assembler.add(chunks[1]) is True
    assert assembler.payload().read() == payload


def test_caps_and_conflicting_metadata_are_rejected() -> None:
    payload = os.urandom(5000)
    _, chunks = _chunks(payload, MIN_CHUNK_BYTES)
    with pytest.raises(PayloadTooLarge):
        ArtifactAssembler(KEY, max_bytes=4999).add(chunks[0])
    with pytest.raises(PayloadTooLarge):
        ArtifactAssembler(KEY, max_chunks=len(chunks) - 1).add(chunks[0])
    with pytest.raises(MalformedPayload):
        ArtifactAssembler("otherkey").add(chunks[0])
    other_info, other = _chunks(os.urandom(5000), MIN_CHUNK_BYTES)
    assembler = ArtifactAssembler(KEY)
    assembler.add(chunks[0])
    with pytest.raises(MalformedPayload, match="disagrees"):
        assembler.add(other[1])
    with pytest.raises(MalformedPayload, match="announced"):
        ArtifactAssembler(KEY, expected=other_info).add(chunks[0])
    for junk in (b"", b"FPAR", chunks[0][:40], b"XXXX" + chunks[0][4:], chunks[0][:-1]):
        with pytest.raises(UpdateRejected):
            ArtifactAssembler(KEY).add(junk)
    with pytest.raises(ConfigError):
        iter_chunks("../evil", payload)
    with pytest.raises(ConfigError):
        iter_chunks(KEY, payload, chunk_bytes=100)
    assert chunk_overhead(KEY) < MIN_CHUNK_BYTES


# --- packing and safe unpacking --------------------------------------------------------------


def _folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "manifest.json").write_text('{"format": 1}')
    (root / "checkpoint").write_bytes(os.urandom(3000))
    (root / "sub" / "deeper" / "x.bin").write_bytes(b"")
    return root


def test_pack_is_deterministic_and_unpacks_to_the_same_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "src")
    first = pack_bytes(folder)
    os.utime(folder / "checkpoint", (0, 0))
    assert pack_bytes(folder) == first
    out = unpack(first, tmp_path / "cache", KEY)
    assert out == tmp_path / "cache" / KEY and cached_folder(tmp_path / "cache", KEY) == out
    for path in folder.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(folder)).read_bytes() == path.read_bytes()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != KEY]  # no leftovers
    assert cached_folder(tmp_path / "cache", "missing") is None


def test_pack_refuses_links(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "src")
    (folder / "link").symlink_to(folder / "checkpoint")
    with pytest.raises(ConfigError, match="regular file"):
        pack_bytes(folder)


def _forged(*files: tuple[str, bytes], count: int | None = None) -> bytes:
    out = [struct.pack("<4sHI", b"FPAK", 1, len(files) if count is None else count)]
    for name, data in files:
        raw = name.encode()
        out.append(struct.pack("<H", len(raw)) + raw + struct.pack("<Q", len(data)) + data)
    return b"".join(out)


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/evil", "a/../../evil", "a//b", "./a", "a\\..\\b", "", "a/./b", "x\x00y"]
)
def test_unpack_rejects_path_traversal(tmp_path: Path, name: str) -> None:
    cache = tmp_path / "cache" / "inner"
    with pytest.raises(MalformedPayload):
        unpack(_forged(("ok.txt", b"1"), (name, b"evil")), cache, KEY)
    assert not (cache / KEY).exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "evil").exists()
    assert list(cache.iterdir()) == []  # the temporary folder is gone too


def test_unpack_rejects_inconsistent_packs(tmp_path: Path) -> None:
    good = _forged(("a", b"12345"))
    for bad in (
        good[:-1],  # truncated file
        good + b"x",  # trailing bytes
        _forged(("a", b"1"), ("A", b"2")),  # a case-only collision
        _forged(("a", b"1"), ("a/b", b"2")),  # a file and a folder of the same name
        _forged(("a", b"1"), count=2),
        _forged(("a", b"1"), count=0),
        b"FPAK\x02\x00" + good[6:],
        b"NOPE" + good[4:],
    ):
        with pytest.raises(UpdateRejected):
            unpack(bad, tmp_path / "cache", KEY)
        assert not (tmp_path / "cache" / KEY).exists()
    assert (unpack(io.BytesIO(good), tmp_path / "cache", KEY) / "a").read_bytes() == b"12345"


# --- wire ----------------------------------------------------------------------------------------


def test_artifact_topics_and_assignment_field() -> None:
    t = wire.artifact_topic("shop", KEY, 7)
    assert t == f"fl/shop/artifact/{KEY}/7"
    assert wire.parse_artifact_topic(t) == ("shop", KEY, 7)
    assert wire.artifact_filter("shop", KEY) == f"fl/shop/artifact/{KEY}/+"
    for bad in (
        f"fl/shop/artifact/{KEY}",
        f"fl/shop/global/{KEY}/1",
        f"fl/shop/artifact/{KEY}/x",
        "fl/a/b/c/d/e",
    ):
        with pytest.raises(MalformedPayload):
            wire.parse_artifact_topic(bad)
    info = ArtifactInfo(KEY, 10, "0" * 64, 1)
    base = wire.Assignment("d", 0, {"x": 1}, wire.topic("shop", "global", "c"))
    with_artifact = wire.Assignment("d", 0, {"x": 1}, base.global_topic, artifact=info.to_dict())
    assert wire.decode_assignment(wire.encode_assignment(with_artifact)) == with_artifact
    assert wire.decode_assignment(wire.encode_assignment(base)).artifact is None
    assert b"artifact" not in wire.encode_assignment(base)  # older devices see the same header
    assert ArtifactInfo.from_dict(with_artifact.artifact) == info
    for bad_ref in ({"key": "../x", "size": 1, "sha256": "0" * 64, "chunks": 1}, {"key": KEY}, [1]):
        with pytest.raises(ConfigError):
            wire.encode_assignment(wire.Assignment("d", 0, {}, base.global_topic, artifact=bad_ref))  # type: ignore[arg-type]


def test_device_engines_prefers_ort_and_checks_what_is_installed() -> None:
    assert device_engines("torch") == ("torch",)
    auto = device_engines("auto")
    # onnxruntime-training's engine where it is installed (CPython <= 3.11), else plain onnxruntime's
    assert auto == (("ort",) if ort_available() else ("ort-plain",)) + ("torch",)
    if not ort_available():
        with pytest.raises(ConfigError, match=r"edge-training.*Linux x86_64 and CPython <= 3.11"):
            device_engines("ort")
    with pytest.raises(ConfigError):
        device_engines("tflite")


# --- end to end in memory --------------------------------------------------------------------


@pytest.mark.skipif(not ort_available(), reason=f"engine ort needs {ORT_TRAINING_INSTALL}")
def test_an_ort_device_fetches_its_artifacts_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx", reason="onnx is needed to build ORT training artifacts")
    from broker_server.allocation import AllocationConfig, Allocator, Candidate, CostEstimate
    from broker_server.evaluation import Evaluator
    from broker_server.service import AggregationService, ServiceConfig
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.config import TrainConfig
    from edge_runtime.data import load_folder
    from edge_runtime.engines.ort_engine import OrtEngine
    from edge_runtime.peft_specs import LoraSpec
    from edge_runtime.transport import InMemoryBroker, InMemoryTransport
    from hw_profiles import DeviceProfile
    from tests.helpers import write_text_folder
    from tests.tiny_model import make_tiny_bert

    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "server-artifacts"))
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=8))
    base = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=8)
    lora = LoraSpec(rank=4, alpha=8.0, target_modules=("query", "value"))

    def predict(c: Candidate, p: DeviceProfile) -> CostEstimate:
        return CostEstimate(memory_mb=400.0, step_s=0.1, trainable_params=1000)

    allocator = Allocator([Candidate(lora, 8, 16)], predict, AllocationConfig(), predict_ort=predict)
    config = ServiceConfig(
        fleet="ortf", rounds=1, train=base, min_clients=1, expected_clients=1, round_timeout_s=60
    )
    broker = InMemoryBroker()
    service = AggregationService(
        InMemoryTransport(broker, "server"),
        config,
        Evaluator(base, test, seed=0, threads=1),
        allocator=allocator,
        artifact_chunk_bytes=64 * 1024,
    )
    service.start()
    cache = tmp_path / "device-cache"
    profile = DeviceProfile(name="pi", ram_mb=1024.0, cores=1, gflops=2.0).to_dict()
    agent = DeviceAgent(
        "pi",
        "ortf",
        InMemoryTransport(broker, "pi"),
        train,
        profile=profile,
        engines=("ort",),
        artifacts_cache=cache,
    )
    agent.on_ready = lambda a: a.run_pending()
    agent.start()
    service.run()

    record = service.devices["pi"]
    assert record.config.engine == "ort" and not record.excluded
    assert len(service.artifacts_published) == 1
    key, info = next(iter(service.artifacts_published.items()))
    assert info.chunks > 1  # really chunked at 64 KiB
    assert agent.assignment is not None and agent.assignment.artifact == info.to_dict()
    assert agent.artifact_folder == cache / key and (cache / key / "manifest.json").is_file()
    assert json.loads((cache / key / "manifest.json").read_text())["key"] == key
    assert [p.name for p in cache.iterdir()] == [key]  # no spool or temporary folder left
    assert any(isinstance(e, OrtEngine) for e in agent._engine_cache.values())
    assert agent.stats.updates_accepted == 2  # the class-mean round and one training round
    assert agent.stats.rounds_trained == [0, 1] and agent.stats.last_error is None
    assert agent.stats.bytes_down >= info.size  # the pack came over the transport, once
    assert service.rounds[-1]["accuracy"] is not None
    assert agent.final_state is not None
    assert all(np.isfinite(v).all() for v in agent.final_state.values())
    chunk_topics = [t for t in broker.retained if t.startswith(f"fl/ortf/artifact/{key}/")]
    assert len(chunk_topics) == info.chunks

    # a second device with the same cache finds the folder and fetches nothing
    again = DeviceAgent(
        "pi2", "ortf", InMemoryTransport(broker, "pi2"), train, engines=("ort",), artifacts_cache=cache
    )
    again._prepare_artifacts(info.to_dict())
    assert again.artifact_folder == cache / key and again._fetch is None
    assert again.stats.bytes_down == 0


def test_edge_command_takes_engine_and_artifacts_cache() -> None:
    from sdk.cli import build_parser
    from sdk.commands import edge_config

    # the flags default to None so that a --config file can supply them; the device's settings
    # (flags over file over defaults) are what the agent runs with
    base = ["edge", "--broker", "mqtt://h:1883", "--fleet", "f", "--device-id", "d", "--data", "x"]
    settings = edge_config(build_parser().parse_args(base))
    assert settings.engine == "auto" and settings.artifacts_cache is None
    settings = edge_config(
        build_parser().parse_args([*base, "--engine", "ort", "--artifacts-cache", "/tmp/c"])
    )
    assert settings.engine == "ort" and str(settings.artifacts_cache) == "/tmp/c"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--engine", "tflite"])


def _agent_with_pack(tmp_path: Path, tamper: bool) -> tuple[DeviceAgent, Path, ArtifactInfo]:
    from edge_runtime.config import TrainConfig
    from edge_runtime.data import TextDataset
    from edge_runtime.peft_specs import LoraSpec
    from edge_runtime.transport import InMemoryBroker, InMemoryTransport

    broker = InMemoryBroker()
    server = InMemoryTransport(broker, "server")
    info, chunks = _chunks(pack_bytes(_folder(tmp_path / "src")), MIN_CHUNK_BYTES)
    if tamper:
        chunks[1] = chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])
    for i, chunk in enumerate(chunks):
        server.publish(wire.artifact_topic("f", KEY, i), chunk, retain=True)
    cache = tmp_path / "cache"
    data = TextDataset(("a", "b"), np.array([0, 1]), ("x", "y"))
    agent = DeviceAgent(
        "d", "f", InMemoryTransport(broker, "d"), data, engines=("ort",), artifacts_cache=cache
    )
    agent.start()
    config = TrainConfig(num_labels=2, peft=LoraSpec(rank=2), engine="ort")
    msg = wire.Assignment("d", 0, config.to_dict(), wire.topic("f", "global", "c"), artifact=info.to_dict())
    server.publish(wire.topic("f", "assign", "d"), wire.encode_assignment(msg))
    return agent, cache, info


def test_the_agent_fetches_a_pack_once_and_gives_up_on_a_corrupt_one(tmp_path: Path) -> None:
    agent, cache, info = _agent_with_pack(tmp_path / "good", tamper=False)
    assert agent.artifact_folder == cache / KEY
    assert (cache / KEY / "sub" / "deeper" / "x.bin").is_file()
    assert agent.stats.bytes_down >= info.size
    bad, bad_cache, _ = _agent_with_pack(tmp_path / "bad", tamper=True)
    assert bad.artifact_folder is None and bad._fetch is None
    assert not (bad_cache / KEY).exists() and list(bad_cache.iterdir()) == []


def test_a_service_without_onnxruntime_training_gives_ort_devices_their_next_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CPython 3.12+ the service cannot build training artifacts: ``ort`` is dropped from what a
    device offers, and a device with nothing else is left out with a reason naming the package."""
    from types import SimpleNamespace

    from broker_server.allocation import NoFeasibleConfig
    from broker_server.registry import DeviceRegistry
    from edge_runtime.config import TrainConfig
    from edge_runtime.engines import ort_engine

    def servable(engines: tuple[str, ...], serve_artifacts: bool = True) -> tuple[str, ...]:
        record = SimpleNamespace(device_id="pi", hello=SimpleNamespace(engines=engines))
        registry = DeviceRegistry(TrainConfig(), None, None, serve_artifacts=serve_artifacts)
        return registry.servable(record)  # type: ignore[arg-type]

    monkeypatch.setattr(ort_engine, "ort_available", lambda: True)
    assert servable(("ort", "torch")) == ("ort", "torch")
    monkeypatch.setattr(ort_engine, "ort_available", lambda: False)
    assert servable(("ort", "torch")) == ("torch",)
    assert servable(("ort-plain", "torch")) == ("ort-plain", "torch")
    assert servable(("ort",), serve_artifacts=False) == ("ort",)  # the simulator hands them over itself
    with pytest.raises(NoFeasibleConfig, match=r"offers only engine ort.*edge-training"):
        servable(("ort",))


def test_training_artifacts_without_onnxruntime_training_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker_server import artifacts
    from broker_server.artifacts import build_artifacts
    from edge_runtime.config import TrainConfig
    from edge_runtime.peft_specs import LoraSpec

    monkeypatch.setattr(artifacts, "ort_available", lambda: False)
    config = TrainConfig(model=str(tmp_path), num_labels=2, peft=LoraSpec(rank=2), engine="ort")
    with pytest.raises(ConfigError, match=r"pip install 'fedpeft\[edge-training\]'.*CPython <= 3.11"):
        build_artifacts(config, cache_dir=tmp_path / "cache")
