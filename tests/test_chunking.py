"""Chunks: oversize updates cross a broker with a size limit instead of vanishing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.chunking import ChunkAssembler, is_chunk, split_payload
from edge_runtime.errors import ConfigError, MalformedPayload, PayloadTooLarge, UpdateRejected
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.integers(256, 2000), st.randoms())
def test_split_and_reassemble_in_any_order(payload: bytes, limit: int, rnd: Any) -> None:
    parts = split_payload(payload, limit)
    assert all(len(p) <= limit for p in parts)
    if len(payload) <= limit:
        assert parts == [payload]
        return
    assert all(is_chunk(p) for p in parts)
    rnd.shuffle(parts)
    asm = ChunkAssembler(max_bytes=10_000)
    results = [asm.add("dev", p) for p in parts]
    assert results[:-1] == [None] * (len(parts) - 1) and results[-1] == payload


def test_bad_chunks_are_rejected() -> None:
    payload = bytes(range(256)) * 20
    parts = split_payload(payload, 1000)
    with pytest.raises(PayloadTooLarge):
        ChunkAssembler(max_bytes=1000).add("d", parts[0])
    asm = ChunkAssembler(max_bytes=100_000)
    with pytest.raises(MalformedPayload):
        asm.add("d", parts[0][:20])
    tampered = [parts[0][:-1] + bytes([parts[0][-1] ^ 1]), *parts[1:]]
    with pytest.raises(MalformedPayload, match="content id"):
        for p in tampered:
            asm.add("d", p)
    flood = ChunkAssembler(max_bytes=100_000, max_pending_per_sender=2)
    for i in range(2):
        other = split_payload(payload + bytes([i]), 1000)
        flood.add("d", other[0])
    with pytest.raises(MalformedPayload, match="in progress"):
        flood.add("d", split_payload(payload + b"x", 1000)[0])
    with pytest.raises(ConfigError):
        split_payload(payload, 10)
    assert issubclass(MalformedPayload, UpdateRejected)
    assert hashlib.sha256(payload).digest() in parts[0]


def test_oversize_messages_vanish_but_chunks_arrive(mosquitto_factory: Callable[..., Any]) -> None:
    import queue

    from edge_runtime.transport import MqttTransport, parse_broker_url

    broker = mosquitto_factory(["max_packet_size 4000"])
    got: queue.Queue[bytes] = queue.Queue()
    sub = MqttTransport(parse_broker_url(broker.url), "sub", clean_start=True).connect()
    big = MqttTransport(parse_broker_url(broker.url), "big", clean_start=True).connect()
    pub = MqttTransport(parse_broker_url(broker.url), "pub", clean_start=True).connect()
    try:
        sub.subscribe("fl/f/update/d", lambda t, p: got.put(p), wait=True)
        payload = bytes(range(256)) * 40  # 10 KB
        # QoS 0, so the client does not retry it forever: mosquitto drops the packet (and the
        # sender's connection) without a word to the subscriber
        big.publish("fl/f/update/d", payload, qos=0)
        with pytest.raises(queue.Empty):
            got.get(timeout=1.5)
        asm = ChunkAssembler(max_bytes=1 << 20)
        for part in split_payload(payload, 3000):
            pub.publish("fl/f/update/d", part, qos=1, wait=True)
        whole = None
        while whole is None:
            whole = asm.add("d", got.get(timeout=5))
        assert whole == payload
    finally:
        sub.close()
        big.close()
        pub.close()


def test_chunked_updates_run_end_to_end(mosquitto_factory: Callable[..., Any], tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    data = write_text_folder(tmp_path / "data", per_class_train=20)
    broker = mosquitto_factory()
    base = dict(
        data=str(data),
        model=str(model),
        clients=2,
        rounds=1,
        partition="iid",
        samples_per_client=20,
        test_samples=20,
        seq_len=16,
        bits=32,
        workers=1,
        broker=broker.url,
        round_timeout_s=20.0,
    )
    report = Simulation(SimulationConfig(**base, max_message_bytes=8000)).run()
    assert [r["participants"] for r in report["rounds"]] == [2, 2]
    assert report["rejected"] == []
    # bytes up count what crossed the broker: the chunks, headers included
    assert report["communication"]["bytes_up_total"] > sum(r["bytes_up"] for r in report["rounds"])
