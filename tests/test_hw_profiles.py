"""Device profiles: bundled ones validate, bad values are refused, and the host measures sensibly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hw_profiles import DeviceProfile, ProfileError, list_profiles, load_profile, measure

EXPECTED = {
    # name: (ram_mb, cores)
    "low": (2048, 1),
    "mid": (4096, 2),
    "high": (8192, 4),
    "pi-zero-2w": (512, 4),
    "pi4-2gb": (2048, 4),
    "pi4-4gb": (4096, 4),
    "pi5-8gb": (8192, 4),
    "jetson-nano": (4096, 4),
    "phone-low": (None, None),
    "phone-mid": (None, None),
    "phone-high": (None, None),
}


def test_every_expected_profile_is_bundled() -> None:
    assert set(EXPECTED) <= set(list_profiles())
    assert list_profiles() == sorted(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_bundled_profile_loads_validates_and_round_trips(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert DeviceProfile.from_dict(p.to_dict()) == p
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p  # JSON-safe, as in hello
    assert "source" in p.description.lower()  # published figures say where they come from
    assert p.tier in ("low", "mid", "high")
    ram, cores = EXPECTED.get(name, (None, None))
    assert ram is None or p.ram_mb == ram
    assert cores is None or p.cores == cores
    assert 0.5 <= p.gflops <= 200 and 0.1 <= p.uplink_mbps <= p.downlink_mbps <= 1000


def test_tiers_and_devices_are_ordered_sensibly() -> None:
    low, mid, high = (load_profile(n) for n in ("low", "mid", "high"))
    assert low.ram_mb < mid.ram_mb < high.ram_mb and low.gflops < mid.gflops < high.gflops
    assert load_profile("pi5-8gb").speed_relative_to(load_profile("pi4-4gb")) == pytest.approx(2.5)
    assert load_profile("pi-zero-2w").gflops < load_profile("pi4-2gb").gflops < load_profile("pi5-8gb").gflops
    assert hash(low) != hash(high)  # frozen and hashable, despite the extra dict


@pytest.mark.parametrize(
    "field, value",
    [
        ("ram_mb", 0),
        ("ram_mb", "4096"),
        ("cores", 0),
        ("cores", 2.5),
        ("cores", True),
        ("gflops", -1.0),
        ("gflops", float("inf")),
        ("availability", 0),
        ("availability", 1.5),
        ("availability", float("nan")),
        ("uplink_mbps", float("nan")),
        ("downlink_mbps", None),
        ("name", ""),
        ("tier", 3),
        ("extra", {"step_s": "fast"}),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    data = load_profile("mid").to_dict() | {field: value}
    with pytest.raises(ProfileError, match=field):
        DeviceProfile.from_dict(data)


def test_unknown_and_missing_keys_are_refused() -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile fields \['gpu'\]"):
        DeviceProfile.from_dict(load_profile("mid").to_dict() | {"gpu": True})
    data = load_profile("mid").to_dict()
    del data["gflops"]
    with pytest.raises(ProfileError, match=r"lacks required fields \['gflops'\]"):
        DeviceProfile.from_dict(data)
    with pytest.raises(ProfileError, match="JSON object"):
        DeviceProfile.from_dict([1, 2])  # type: ignore[arg-type]


def test_unknown_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"known: .*pi4-4gb"):
        load_profile("toaster")
    with pytest.raises(ProfileError, match="cannot read device profile file"):
        load_profile(str(tmp_path / "missing.json"))
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(load_profile("mid").to_dict() | {"name": "mine"}))
    assert load_profile(str(path)).name == "mine" and load_profile(path).name == "mine"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path)
    path.write_text(json.dumps(load_profile("mid").to_dict() | {"cores": 0}))
    with pytest.raises(ProfileError, match=r"mine\.json.*cores"):
        load_profile(path)


def test_profile_error_is_a_value_error() -> None:
    # edge_runtime wraps it in ConfigError; callers that only know ValueError still catch it
    assert issubclass(ProfileError, ValueError)


def test_measure_this_host() -> None:
    start = time.monotonic()
    p = measure(step_probe=lambda: 0.25)
    assert time.monotonic() - start < 1.5
    assert p.name == "host" and p.availability == 1.0
    assert p.ram_mb > 100 and p.cores >= 1 and p.gflops > 0.1
    assert p.uplink_mbps > 0 and p.downlink_mbps > 0
    assert p.extra == {"step_s": 0.25}
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert measure(matmul_size=64, repeats=1).extra == {}
    with pytest.raises(ProfileError, match="step_probe"):
        measure(step_probe=lambda: -1.0)
