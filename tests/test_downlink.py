"""The delta downlink: devices rebuild exactly the module the service holds, from few bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import wire
from edge_runtime.downlink import DownlinkEncoder, ModuleReceiver, apply_delta, state_digest
from edge_runtime.errors import ShapeMismatch

SHAPES = {
    "layer.0.lora_A": (8, 384),
    "layer.0.lora_B": (384, 8),
    "head.weight": (20, 384),
    "head.bias": (20,),
}


def _states(seed: int, versions: int, step: float = 0.05) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out = [state]
    for _ in range(versions - 1):
        state = {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}
        out.append(state)
    return out


def _publish(encoder: DownlinkEncoder, states: list[dict[str, np.ndarray]]) -> list[tuple[bytes, dict]]:
    sent = []
    for r, target in enumerate(states):
        payload, held = encoder.encode(target, round_=r, config_id="c", meta={"phase": "train"}, seed=3)
        sent.append((payload, held))
    return sent


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([8, 4, 2]), st.integers(2, 6))
def test_devices_hold_exactly_the_services_module(seed: int, bits: int, versions: int) -> None:
    encoder, device = DownlinkEncoder(bits), ModuleReceiver()
    for payload, held in _publish(encoder, _states(seed, versions)):
        got = device.receive(payload)
        assert got is not None and not device.needs_full
        for name, value in held.items():
            np.testing.assert_array_equal(got.module.tensors[name], value)  # bit for bit
        assert state_digest(got.module.tensors) == state_digest(held) == got.module.meta["digest"]
        assert got.module_id == wire.content_id(payload)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([8, 4, 2]), st.integers(2, 12))
def test_error_feedback_loses_nothing_it_only_delays(seed: int, bits: int, rounds: int) -> None:
    # The service adopts what devices hold and adds each round's step to it, as the service does.
    # Held + residual must then equal the first module as devices received it (the start) plus
    # every step so far, at every version: quantization error is carried, never dropped nor
    # counted twice.
    rng = np.random.default_rng(seed)
    encoder = DownlinkEncoder(bits)
    first = _states(seed, 1)[0]
    _, adopted = encoder.encode(first, round_=0, config_id="c", meta={}, seed=3)
    exact = {k: v.astype(np.float64) for k, v in adopted.items()}
    for r in range(1, rounds):
        step = {k: 0.05 * rng.standard_normal(v.shape) for k, v in first.items()}
        exact = {k: exact[k] + step[k] for k in exact}
        state = {k: (adopted[k] + step[k]).astype(np.float32) for k in adopted}
        exact = {k: exact[k] + (state[k] - (adopted[k] + step[k])) for k in exact}  # float32 rounding
        _, adopted = encoder.encode(state, round_=r, config_id="c", meta={}, seed=3)
        for name in exact:
            rebuilt = np.asarray(adopted[name], np.float64) + encoder.residual[name]
            np.testing.assert_allclose(rebuilt, exact[name], rtol=0, atol=1e-5)


def test_an_unchanged_module_stays_exactly_what_devices_first_received() -> None:
    # nothing trains: the 16-bit first module is the start everyone adopted, so later versions
    # send nothing and the module must not move (nor alternate between the fp32 values and their
    # rounding, version after version, as it did when residuals were counted twice)
    first = _states(5, 1)[0]
    encoder = DownlinkEncoder(8)
    _, start = encoder.encode(first, round_=0, config_id="c", meta={}, seed=3)
    adopted = start
    for r in range(1, 6):
        payload, adopted = encoder.encode(adopted, round_=r, config_id="c", meta={}, seed=3)
        assert wire.decode_global(payload).tensors == {}
        for k in start:
            np.testing.assert_array_equal(adopted[k], start[k])


def test_the_first_module_is_whole_at_16_bits_then_deltas_at_the_uplinks_bits() -> None:
    states = _states(0, 3)
    sent = _publish(DownlinkEncoder(4), states)
    first, second = wire.decode_global(sent[0][0]), wire.decode_global(sent[1][0])
    assert "base" not in first.meta and second.meta["base"] == wire.content_id(sent[0][0])
    # 16-bit first module, then 4-bit deltas: about a quarter of the bytes
    assert len(sent[1][0]) < 0.4 * len(sent[0][0])
    np.testing.assert_allclose(first.tensors["head.weight"], states[0]["head.weight"], rtol=2**-10)


def test_an_unchanged_tensor_is_left_out_of_the_delta() -> None:
    a = _states(0, 1)[0]
    b = dict(a) | {"head.bias": a["head.bias"] + 1}
    sent = _publish(DownlinkEncoder(8), [a, b])
    delta = wire.decode_global(sent[1][0])
    assert set(delta.tensors) <= {"head.bias"} | {k for k in SHAPES if "lora" in k or "weight" in k}
    assert "head.bias" in delta.tensors


def test_a_device_without_the_base_asks_for_the_full_module_and_then_follows() -> None:
    encoder, late = DownlinkEncoder(4), ModuleReceiver()
    sent = _publish(encoder, _states(1, 3))
    assert late.receive(sent[2][0]) is None and late.needs_full  # joined late: has no base
    full = encoder.full(round_=2, config_id="c", meta={"phase": "train"})
    got = late.receive(full)
    assert got is not None and not late.needs_full
    assert got.module_id == wire.content_id(sent[2][0])  # the same version as the shared delta
    np.testing.assert_array_equal(got.module.tensors["head.weight"], sent[2][1]["head.weight"])
    nxt, _ = encoder.encode(_states(2, 1)[0], round_=3, config_id="c", meta={"phase": "train"}, seed=3)
    assert late.receive(nxt) is not None  # and applies the next delta


def test_redeliveries_are_ignored_and_a_wrong_digest_is_never_trained_on() -> None:
    encoder, device = DownlinkEncoder(8), ModuleReceiver()
    sent = _publish(encoder, _states(2, 2))
    assert device.receive(sent[0][0]) is not None
    assert device.receive(sent[0][0]) is None and not device.needs_full  # retained copy again
    module = wire.decode_global(sent[1][0])
    forged = wire.encode_global(
        wire.GlobalModule(1, "c", module.tensors, dict(module.meta) | {"digest": "0" * 64}), bits=32
    )
    assert device.receive(forged) is None and device.needs_full


def test_apply_delta_checks_names_and_shapes() -> None:
    base = {"a": np.zeros((2, 3), np.float32)}
    with pytest.raises(ShapeMismatch, match="lacks"):
        apply_delta(base, {"b": np.zeros(1, np.float32)})
    with pytest.raises(ShapeMismatch, match="shape"):
        apply_delta(base, {"a": np.zeros((3, 2), np.float32)})
    np.testing.assert_array_equal(apply_delta(base, {})["a"], base["a"])
