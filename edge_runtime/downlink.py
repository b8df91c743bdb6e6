"""The downlink: global modules sent as quantized deltas against the version a device holds.

Every device trains from the same global module, so the service need not send all of it every
round: it sends what changed since the version devices hold, quantized like the uplink. To keep
devices *exactly* on the module the service holds, the service adopts the module that devices
rebuild (``held + dequantized delta``, in float32, bit for bit the same on both sides) as its
state, and keeps what quantization left out in a server-side residual that joins the next delta
(error feedback: nothing is lost over rounds, it only arrives a round later).

A global message is one of:

- **full**: ``meta`` has no ``base``; its tensors are the module (the first one a fleet gets is
  sent at 16 bits, a resync at 32);
- **delta**: ``meta["base"]`` is the id of the module it applies to and its tensors are the
  differences; a tensor left out did not change;
- **empty**: no tensors at all (the class-statistics round needs only the frozen base model).

``meta["digest"]`` is :func:`state_digest` of the module after the message, and a device checks it
before training. ``meta["module_id"]``, where present, is the id that updates must name as their
base (a resync's full module names the shared delta's id, so both count as the same version);
otherwise the id is the message's own content id. A device that cannot apply a delta (it has no
base, or the wrong one: it was away, or just joined) asks for the full module with a ``resync``
status and gets it on its own global topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_runtime import wire
from edge_runtime.errors import ShapeMismatch

RESYNC_STATE = "resync"
"""The status a device publishes when it needs the full module."""


def state_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over a module's tensor names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(np.asarray(tensors[name], dtype="<f4"))
        h.update(name.encode())
        h.update(np.asarray(value.shape, dtype="<i8").tobytes())
        h.update(value.tobytes())
    return h.hexdigest()


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` in float32; tensors missing from ``delta`` are unchanged."""
    extra = set(delta) - set(base)
    if extra:
        raise ShapeMismatch(f"delta names tensors the base lacks: {sorted(extra)[:3]}")
    out: dict[str, np.ndarray] = {}
    for name, value in base.items():
        b = np.asarray(value, dtype=np.float32)
        if name in delta:
            d = np.asarray(delta[name], dtype=np.float32)
            if d.shape != b.shape:
                raise ShapeMismatch(f"{name}: delta of shape {d.shape} for a tensor of shape {b.shape}")
            out[name] = (b + d).astype(np.float32)
        else:
            out[name] = b.copy()
    return out


def module_id(payload: bytes, module: wire.GlobalModule) -> str:
    """The id an update names as its base when it trained on this message's module."""
    return str(module.meta.get("module_id") or wire.content_id(payload))


@dataclass(frozen=True)
class Received:
    """A global module a device can train on: its tensors, its id and its message."""

    module: wire.GlobalModule
    module_id: str


class ModuleReceiver:
    """The device side: the module it holds, rebuilt from full and delta messages in order.

    :meth:`receive` returns the module to train on, or None when the message brought nothing new
    (a redelivery) or could not be applied (then :attr:`needs_full` is set and the caller asks
    for the full module).
    """

    def __init__(self) -> None:
        self.held: dict[str, np.ndarray] | None = None
        self.held_id: str | None = None
        self._seen: set[str] = set()
        self.needs_full = False

    def receive(self, payload: bytes) -> Received | None:
        """Decode one global message and bring the held module up to date."""
        module = wire.decode_global(payload)
        cid = wire.content_id(payload)
        mid = module_id(payload, module)
        if cid in self._seen or (mid == self.held_id and self.held is not None):
            return None  # a redelivery (a retained copy after a reconnect, or QoS 1 again)
        base = module.meta.get("base")
        if not module.tensors and base is None:
            self._seen.add(cid)  # nothing to hold: a statistics round needs only the frozen base
            return Received(module, mid)
        if base is None:
            tensors = {k: np.asarray(v, dtype=np.float32) for k, v in module.tensors.items()}
        elif self.held is not None and base == self.held_id:
            tensors = apply_delta(self.held, module.tensors)
        else:
            self.needs_full = True
            return None
        digest = module.meta.get("digest")
        if digest is not None and state_digest(tensors) != digest:
            self.needs_full = True  # never train on a module the service does not hold
            return None
        self.held, self.held_id, self.needs_full = tensors, mid, False
        self._seen.add(cid)
        full = wire.GlobalModule(module.round, module.config_id, tensors, dict(module.meta))
        return Received(full, mid)


class DownlinkEncoder:
    """The service side: turns each new global state into the message devices rebuild it from.

    ``bits`` is the delta's width (the uplink's), ``full_bits`` the first module's. After
    :meth:`encode` the caller must adopt the returned state: it is what devices will hold.
    """

    def __init__(self, bits: int, full_bits: int = 16) -> None:
        self.bits = bits
        self.full_bits = full_bits
        self.held: dict[str, np.ndarray] | None = None
        self.held_id: str | None = None
        self.residual: dict[str, np.ndarray] = {}

    def encode(
        self,
        state: Mapping[str, np.ndarray],
        *,
        round_: int,
        config_id: str,
        meta: dict[str, object],
        seed: int,
    ) -> tuple[bytes, dict[str, np.ndarray]]:
        """The message for ``state`` and the state devices will hold after applying it."""
        rng_seed = [int(seed) & 0xFFFFFFFF, int(round_) & 0xFFFFFFFF, 0xD0]
        # what the caller asks for plus what earlier messages left out: the caller adopted the
        # state this encoder returned, so the residual is not already inside ``state``
        target = {
            name: np.asarray(value, np.float64) + self.residual.get(name, 0.0)
            for name, value in state.items()
        }
        if self.held is None:
            bits, tensors, base = self.full_bits, dict(state), None
        else:
            bits, base = self.bits, self.held_id
            tensors = {}
            for name, value in target.items():
                d = value - np.asarray(self.held[name], np.float64)
                if np.any(d):
                    tensors[name] = d.astype(np.float32)
        draft = {**meta, **({"base": base} if base is not None else {})}
        first = wire.encode_global(
            wire.GlobalModule(round_, config_id, tensors, draft),
            bits=bits,
            rng=np.random.default_rng(rng_seed),
        )
        sent = wire.decode_global(first, max_bytes=max(len(first), wire.DEFAULT_MAX_PAYLOAD)).tensors
        if base is None:
            new = {k: np.asarray(v, dtype=np.float32) for k, v in sent.items()}
        else:
            assert self.held is not None
            new = apply_delta(self.held, sent)
        # the same tensors (same seed, same order) with the digest of the result in the header
        payload = wire.encode_global(
            wire.GlobalModule(round_, config_id, tensors, {**draft, "digest": state_digest(new)}),
            bits=bits,
            rng=np.random.default_rng(rng_seed),
        )
        if base is None:
            # the first module is the start everyone adopts at its 16 bits: nothing is owed on it
            # (FFA's frozen A, for one, must stay exactly what devices first received)
            self.residual = {}
        else:
            self.residual = {k: target[k] - np.asarray(new[k], np.float64) for k in state}
        self.held, self.held_id = new, wire.content_id(payload)
        return payload, new

    def restore(
        self, held: Mapping[str, np.ndarray], held_id: str, residual: Mapping[str, np.ndarray]
    ) -> None:
        """Continue after a restart from what was published last."""
        self.held = {k: np.asarray(v, dtype=np.float32) for k, v in held.items()}
        self.held_id = held_id
        self.residual = {k: np.asarray(v, dtype=np.float64) for k, v in residual.items()}

    def full(self, *, round_: int, config_id: str, meta: dict[str, object]) -> bytes:
        """The held module whole, at 32 bits, for a device that cannot apply the deltas."""
        if self.held is None or self.held_id is None:
            raise ShapeMismatch("no module has been published yet")
        return wire.encode_global(
            wire.GlobalModule(
                round_,
                config_id,
                dict(self.held),
                {**meta, "module_id": self.held_id, "digest": state_digest(self.held)},
            ),
            bits=32,
        )
