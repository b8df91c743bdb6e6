"""Exact aggregation of LoRA modules of different ranks, with server-side error feedback.

FedIT averages the factors, A = sum p_c A_c and B = sum p_c B_c, but the update the model applies
is the product, and (sum p_c B_c)(sum p_c A_c) is not sum p_c B_c A_c: the cross terms are noise,
and factors of different ranks cannot be averaged at all without padding (:func:`fedit_gap`
measures the difference). Here the server averages the products instead, which is exact for any
mix of ranks, and factorizes the mean again by truncated SVD (FlexLoRA, Bai et al. 2024), split
evenly so that scale * B A is the rank-r truncation and both factors carry sqrt of the spectrum.

The factors of every requested rank come from one SVD: the rank-r factors are the leading r columns
of B and rows of A of the largest rank, i.e. the leading corners of the super-state that
:mod:`broker_server.heterogeneous` hands to smaller devices, and by Eckart-Young each corner is the
best rank-r approximation of the global product (zero-padded factor averaging promises no such thing).

Residual semantics (error feedback, one full-size float64 matrix per LoRA pair, server-side only):

- round t factorizes the target T_t = M_t + R_{t-1}, where M_t = sum_c p_c scale_c B_c A_c over
  the clients that sent the pair and R_0 = 0 (``residual=None``);
- the published factors at the largest requested rank r_max satisfy scale * B A = T_t truncated to
  rank r_max, up to the float32 rounding of the factors;
- the new residual is R_t = T_t - scale * B A, computed in float64 with the float32 factors as
  published, so even their rounding is fed back; hence, every round, exactly
  scale * B_t A_t + R_t = M_t + R_{t-1}, and over rounds sum_t scale * B_t A_t + R_T = sum_t M_t;
- devices never see R; it is what the published module leaves out of the ideal global product
  W0 + T_t. Their next products build on scale * B_t A_t, so adding R_t back to the next mean puts
  the missing part where it belongs. Truncation to smaller ranks (devices given a corner) is not
  fed back: the residual is measured against the largest rank only;
- a pair that no client sent this round is left out of the factors (the caller keeps its current
  global factors) and its residual, if any, is carried over unchanged.

Pairs are found by name: ``<prefix>.lora_A`` / ``<prefix>.lora_B`` (the wire names, see
``_canonical`` in the torch engine) or ``<prefix>.lora_A.weight`` / ``<prefix>.lora_B.weight``
(peft's names); A has shape (r, in), B has shape (out, r). Other tensors (the head) are ignored:
aggregate them with :func:`broker_server.aggregation.fedit`.

All functions are pure: they never mutate their inputs and compute in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from broker_server.aggregation import ClientUpdate, State, fedit
from edge_runtime.errors import ConfigError, NonFinite, ShapeMismatch

Pair = tuple[str, str]
"""The names of one LoRA pair: (A's name, B's name)."""

_SUFFIXES: tuple[tuple[str, str], ...] = (("lora_A.weight", "lora_B.weight"), ("lora_A", "lora_B"))


def _split(name: str) -> tuple[str, str, str] | None:
    """(prefix, "A" or "B", suffix style) for a LoRA factor's name, None for any other tensor."""
    for suffix_a, suffix_b in _SUFFIXES:
        for which, suffix in (("A", suffix_a), ("B", suffix_b)):
            if name == suffix or name.endswith("." + suffix):
                return name[: -len(suffix)].rstrip("."), which, suffix_a
    return None


def lora_pairs(names: Iterable[str]) -> dict[str, Pair]:
    """The LoRA pairs among these tensor names (or a state's keys), by prefix: {prefix: (a, b)}.

    Names that are not LoRA factors are ignored. Raises :class:`ShapeMismatch` if an A has no B
    (or the reverse) or if one prefix is spelled in two styles.
    """
    found: dict[str, dict[str, str]] = {}
    styles: dict[str, set[str]] = {}
    for name in names:
        parsed = _split(name)
        if parsed is None:
            continue
        prefix, which, style = parsed
        slot = found.setdefault(prefix, {})
        if which in slot:
            raise ShapeMismatch(
                f"LoRA pair {prefix!r}: both {slot[which]!r} and {name!r} name factor {which}"
            )
        slot[which] = name
        styles.setdefault(prefix, set()).add(style)
    pairs: dict[str, Pair] = {}
    for prefix, slot in sorted(found.items()):
        if "A" not in slot or "B" not in slot:
            have, missing = ("A", "B") if "A" in slot else ("B", "A")
            raise ShapeMismatch(f"LoRA pair {prefix!r}: {slot[have]!r} has no matching lora_{missing}")
        a, b = slot["A"], slot["B"]
        if len(styles[prefix]) > 1:
            raise ShapeMismatch(f"LoRA pair {prefix!r}: {a!r} and {b!r} use different name styles")
        pairs[prefix] = (a, b)
    return pairs


@dataclass(frozen=True)
class ExactAggregate:
    """The result of :func:`exact_aggregate`.

    ``factors[r]`` holds, for every pair some client sent, A of shape (r, in) and B of shape
    (out, r) in float32 under the clients' names; smaller ranks are leading corners of the largest.
    ``residual[prefix]`` is the (out, in) float64 error-feedback matrix to pass to the next round.
    ``singular_values[prefix]`` is the whole spectrum of the target that was factorized (for reports).
    """

    factors: dict[int, State]
    residual: dict[str, np.ndarray]
    singular_values: dict[str, np.ndarray]

    def product(self, prefix: str, rank: int, scale: float) -> np.ndarray:
        """scale * B A of this pair at this rank, in float64 (what a device of that rank applies)."""
        a_name, b_name = _names_in(self.factors[rank], prefix)
        return scale * np.asarray(self.factors[rank][b_name], np.float64) @ self.factors[rank][a_name]


def _names_in(state: Mapping[str, np.ndarray], prefix: str) -> Pair:
    pairs = lora_pairs(state)
    if prefix not in pairs:
        raise ConfigError(f"no LoRA pair {prefix!r}; known: {', '.join(pairs) or 'none'}")
    return pairs[prefix]


def _positive(value: float, what: str) -> float:
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ConfigError(f"{what} must be positive and finite, got {value!r}")
    return v


def _probabilities(weights: Sequence[float], n: int) -> np.ndarray:
    """Validated sample counts (each positive and finite) as an array of length n."""
    if n == 0:
        raise ConfigError("cannot aggregate zero clients")
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} clients")
    return np.array([_positive(w, f"weight of client {i}") for i, w in enumerate(weights)])


def _scales(scale: float | Sequence[float], n: int) -> np.ndarray:
    if isinstance(scale, int | float | np.floating | np.integer):
        return np.full(n, _positive(float(scale), "scale"))
    if len(scale) != n:
        raise ConfigError(f"got {len(scale)} scales for {n} clients")
    return np.array([_positive(s, f"scale of client {i}") for i, s in enumerate(scale)])


def _matrix(value: object, name: str, client: int | None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    who = f"client {client}'s " if client is not None else ""
    if arr.ndim != 2:
        raise ShapeMismatch(f"{who}{name}: expected a matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise NonFinite(f"{who}{name} holds NaN or infinity")
    return arr


@dataclass(frozen=True)
class _Factors:
    """One pair's validated factors from every client that sent it."""

    names: Pair
    clients: list[int]
    a: list[np.ndarray]  # (r_c, in)
    b: list[np.ndarray]  # (out, r_c)

    @property
    def shape(self) -> tuple[int, int]:
        return self.b[0].shape[0], self.a[0].shape[1]


def _gather(clients: Sequence[Mapping[str, np.ndarray]]) -> dict[str, _Factors]:
    """Every pair that any client sent, with checked shapes and names (pairs sorted by prefix)."""
    gathered: dict[str, _Factors] = {}
    for i, client in enumerate(clients):
        for prefix, (a_name, b_name) in lora_pairs(client).items():
            a = _matrix(client[a_name], a_name, i)
            b = _matrix(client[b_name], b_name, i)
            if a.shape[0] != b.shape[1]:
                raise ShapeMismatch(
                    f"client {i}'s pair {prefix!r}: A has rank {a.shape[0]} ({a.shape}) "
                    f"but B has rank {b.shape[1]} ({b.shape})"
                )
            if a.shape[0] == 0:
                raise ShapeMismatch(f"client {i}'s pair {prefix!r} has rank 0")
            entry = gathered.setdefault(prefix, _Factors((a_name, b_name), [], [], []))
            if entry.names != (a_name, b_name):
                raise ShapeMismatch(
                    f"client {i} names pair {prefix!r} {(a_name, b_name)}, others {entry.names}"
                )
            if entry.a and (b.shape[0], a.shape[1]) != entry.shape:
                raise ShapeMismatch(
                    f"client {i}'s pair {prefix!r} maps {a.shape[1]} -> {b.shape[0]}, "
                    f"client {entry.clients[0]}'s maps {entry.shape[1]} -> {entry.shape[0]}"
                )
            entry.clients.append(i)
            entry.a.append(a)
            entry.b.append(b)
    if not gathered:
        raise ConfigError("no LoRA pairs in any client's module")
    return dict(sorted(gathered.items()))


def _exact_mean(pair: _Factors, p: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """sum_c p_c scale_c B_c A_c over the clients that sent the pair, p renormalized over them."""
    w = p[pair.clients] / p[pair.clients].sum()
    mean = np.zeros(pair.shape)
    for wc, sc, a, b in zip(w, scales[pair.clients], pair.a, pair.b, strict=True):
        mean += (wc * sc) * (b @ a)
    return mean


def _ranks(ranks: Sequence[int]) -> list[int]:
    if len(ranks) == 0:
        raise ConfigError("request at least one rank")
    out: set[int] = set()
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r <= 0:
            raise ConfigError(f"ranks must be positive integers, got {r!r}")
        out.add(int(r))
    return sorted(out)


def _svd(target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD with a fixed sign per component (largest |u| entry positive), for reproducibility."""
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    pivot = np.argmax(np.abs(u), axis=0)
    signs = np.where(u[pivot, np.arange(u.shape[1])] < 0, -1.0, 1.0)
    return u * signs, s, vt * signs[:, None]


def exact_aggregate(
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    ranks: Sequence[int],
    scale: float | Sequence[float],
    residual: Mapping[str, np.ndarray] | None = None,
    *,
    out_scale: float | None = None,
) -> ExactAggregate:
    """Average the clients' LoRA products exactly and re-factorize them at each requested rank.

    ``clients`` are the clients' full LoRA factors (not deltas), of any ranks; ``weights`` their
    sample counts (each positive; normalized per pair over the clients that sent it). ``scale``
    is alpha / r, one for all or one per client; the published factors use ``out_scale``, by
    default the common scale (required if the clients' scales differ). ``residual`` is the
    previous round's :attr:`ExactAggregate.residual` (see the module docstring for its meaning).

    Raises :class:`ConfigError` for bad weights, scales or ranks (a rank above min(out, in) of a
    pair included), :class:`ShapeMismatch` for unpaired or inconsistent factors or a residual of
    the wrong shape, and :class:`NonFinite` for NaN or infinity in a factor or the residual.
    """
    p = _probabilities(weights, len(clients))
    scales = _scales(scale, len(clients))
    if out_scale is None:
        if not np.all(scales == scales[0]):
            raise ConfigError("the clients' scales differ: give out_scale for the published factors")
        out = float(scales[0])
    else:
        out = _positive(out_scale, "out_scale")
    wanted = _ranks(ranks)
    gathered = _gather(clients)
    previous = dict(residual or {})
    for prefix, value in previous.items():
        _matrix(value, f"residual of {prefix!r}", None)
    for prefix, pair in gathered.items():
        if wanted[-1] > min(pair.shape):
            raise ConfigError(
                f"rank {wanted[-1]} exceeds min(out, in) = {min(pair.shape)} of pair {prefix!r} {pair.shape}"
            )
        if prefix in previous and np.shape(previous[prefix]) != pair.shape:
            raise ShapeMismatch(
                f"residual of {prefix!r} has shape {np.shape(previous[prefix])}, the pair is {pair.shape}"
            )

    factors: dict[int, State] = {r: {} for r in wanted}
    new_residual: dict[str, np.ndarray] = {
        k: np.array(v, dtype=np.float64) for k, v in previous.items() if k not in gathered
    }
    spectra: dict[str, np.ndarray] = {}
    top = wanted[-1]
    for prefix, pair in gathered.items():
        target = _exact_mean(pair, p, scales)
        if prefix in previous:
            target += np.asarray(previous[prefix], dtype=np.float64)
        u, s, vt = _svd(target)
        root = np.sqrt(s[:top] / out)
        b = (u[:, :top] * root).astype(np.float32)
        a = (root[:, None] * vt[:top]).astype(np.float32)
        a_name, b_name = pair.names
        for r in wanted:
            factors[r][a_name] = np.ascontiguousarray(a[:r])
            factors[r][b_name] = np.ascontiguousarray(b[:, :r])
        # against the float32 factors as published, so their rounding is fed back too
        new_residual[prefix] = target - out * (b.astype(np.float64) @ a.astype(np.float64))
        spectra[prefix] = s
    return ExactAggregate(factors, dict(sorted(new_residual.items())), spectra)


def fedit_gap(
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    scale: float,
    *,
    relative: bool = False,
) -> dict[str, float]:
    """Per pair, || scale * (sum p B_c A_c - (sum p B_c)(sum p A_c)) ||_F: what FedIT gets wrong.

    Mixed ranks are averaged as :func:`broker_server.heterogeneous.coverage_mean` does (each
    row of A and column of B over the clients that have it), so this is the error of the rule the
    service runs; with equal ranks that is plain FedIT. With ``relative`` each gap is divided by
    || scale * sum p B_c A_c ||_F (and is 0 where that is 0).
    """
    p = _probabilities(weights, len(clients))
    s = _positive(scale, "scale")
    gaps: dict[str, float] = {}
    for prefix, pair in _gather(clients).items():
        exact = _exact_mean(pair, p, np.full(len(clients), s))
        rank = max(a.shape[0] for a in pair.a)
        out, inp = pair.shape
        sum_a, cover_a = np.zeros((rank, inp)), np.zeros((rank, 1))
        sum_b, cover_b = np.zeros((out, rank)), np.zeros((1, rank))
        for c, a, b in zip(pair.clients, pair.a, pair.b, strict=True):
            r = a.shape[0]
            sum_a[:r] += p[c] * a
            cover_a[:r] += p[c]
            sum_b[:, :r] += p[c] * b
            cover_b[:, :r] += p[c]
        averaged = s * (sum_b / cover_b) @ (sum_a / cover_a)
        gap = float(np.linalg.norm(exact - averaged))
        if relative:
            norm = float(np.linalg.norm(exact))
            gap = gap / norm if norm > 0 else 0.0
        gaps[prefix] = gap
    return gaps


def ffa_aggregate(
    global_state: Mapping[str, np.ndarray],
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
) -> State:
    """FFA-LoRA (Sun et al. 2024): A stays the global one, B is the sample-weighted mean.

    With A frozen and shared, (sum p B_c) A = sum p B_c A, so this is exact, at the price of
    training half the factors. Returns every LoRA pair of ``global_state`` (float32): A copied
    unchanged, B averaged per column over the clients whose rank covers it (a column nobody
    covered, or a pair nobody sent, keeps its global value). The clients' A, if sent, is ignored:
    it is frozen, and a device's copy may carry down-link quantization noise. Other tensors are
    not returned. Raises like :func:`exact_aggregate`.
    """
    p = _probabilities(weights, len(clients))
    pairs = lora_pairs(global_state)
    if not pairs:
        raise ConfigError("no LoRA pairs in the global state")
    new: State = {}
    for prefix, (a_name, b_name) in pairs.items():
        a_global = _matrix(global_state[a_name], a_name, None)
        b_global = _matrix(global_state[b_name], b_name, None)
        if a_global.shape[0] != b_global.shape[1]:
            raise ShapeMismatch(f"global pair {prefix!r}: A {a_global.shape} and B {b_global.shape} disagree")
        total = np.zeros(b_global.shape)
        cover = np.zeros((1, b_global.shape[1]))
        for i, client in enumerate(clients):
            if b_name not in client:
                continue
            b = _matrix(client[b_name], b_name, i)
            if b.shape[0] != b_global.shape[0] or b.shape[1] > b_global.shape[1]:
                raise ShapeMismatch(
                    f"client {i}'s {b_name} has shape {b.shape}, the global is {b_global.shape}"
                )
            total[:, : b.shape[1]] += p[i] * b
            cover[:, : b.shape[1]] += p[i]
        covered = np.broadcast_to(cover > 0, total.shape)
        mean = np.divide(total, cover, out=np.zeros_like(total), where=covered)
        new[a_name] = a_global.astype(np.float32)
        new[b_name] = np.where(covered, mean, b_global).astype(np.float32)
    return new


def exact_fedavg(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    scale: float,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[State, dict[str, np.ndarray]]:
    """One round of ``--strategy exact`` on a fleet that trains one LoRA configuration.

    Devices send deltas against ``global_state``; their full factors are the global ones plus
    their deltas. LoRA pairs are averaged exactly (:func:`exact_aggregate`) and re-factorized at
    the global rank, with ``residual`` (the previous round's) fed back; every other tensor (the
    head) is averaged as FedIT does. Returns the new global state and the new residual.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    pairs = lora_pairs(global_state)
    if not pairs:
        raise ConfigError("--strategy exact needs LoRA factors in the global module")
    lora = {name for pair in pairs.values() for name in pair}
    counted = [u for u in updates if u.num_samples > 0] or list(updates)
    clients = [
        {
            n: np.asarray(global_state[n], dtype=np.float64) + np.asarray(u.delta[n], dtype=np.float64)
            for n in lora
        }
        for u in counted
    ]
    weights = [float(max(u.num_samples, 1)) for u in counted]
    rank = max(int(np.shape(global_state[a])[0]) for a, _ in pairs.values())
    result = exact_aggregate(clients, weights, [rank], scale, residual)
    rest_state = {k: v for k, v in global_state.items() if k not in lora}
    rest: State = {}
    if rest_state:
        others = [
            ClientUpdate(u.device_id, u.num_samples, {k: u.delta[k] for k in rest_state}, u.metrics)
            for u in updates
        ]
        rest = fedit(rest_state, others)
    return {**rest, **result.factors[rank]}, result.residual


def ffa_fedavg(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """One round of ``--strategy ffa`` (FFA-LoRA) on a fleet that trains one LoRA configuration.

    Devices send deltas against ``global_state``. LoRA pairs go through :func:`ffa_aggregate` on
    the clients' full factors (global plus delta): A stays the global one, B is the sample-weighted
    mean. Every other tensor (the head) is averaged as FedIT does. Returns the new global state.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    pairs = lora_pairs(global_state)
    if not pairs:
        raise ConfigError("--strategy ffa needs LoRA factors in the global module")
    b_names = [b for _, b in pairs.values()]
    counted = [u for u in updates if u.num_samples > 0] or list(updates)
    clients = [
        {
            n: np.asarray(global_state[n], dtype=np.float64) + np.asarray(u.delta[n], dtype=np.float64)
            for n in b_names
        }
        for u in counted
    ]
    weights = [float(max(u.num_samples, 1)) for u in counted]
    lora_state = ffa_aggregate(global_state, clients, weights)
    lora = {name for pair in pairs.values() for name in pair}
    rest_state = {k: v for k, v in global_state.items() if k not in lora}
    rest: State = {}
    if rest_state:
        others = [
            ClientUpdate(u.device_id, u.num_samples, {k: u.delta[k] for k in rest_state}, u.metrics)
            for u in updates
        ]
        rest = fedit(rest_state, others)
    return {**rest, **lora_state}
