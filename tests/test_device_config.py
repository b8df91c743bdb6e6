"""`fedpeft edge --config FILE`: the TOML file, its errors, the credentials file, the systemd unit."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime import wire
from edge_runtime.device_config import DeviceConfig, device_config, read_credentials
from edge_runtime.errors import ConfigError
from edge_runtime.outbox import Outbox
from edge_runtime.transport import MqttTransport, parse_broker_url
from sdk.cli import EX_TEMPFAIL, main
from tests.helpers import write_text_folder

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "docs" / "systemd" / "fedpeft-edge.service"
EXAMPLE = ROOT / "docs" / "systemd" / "edge.toml"

BASE = """\
broker = "mqtt://127.0.0.1:1"
fleet = "lab"
device_id = "pi-1"
data = "data"
state = "state"
"""


def _write(folder: Path, text: str, name: str = "edge.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _credentials(folder: Path, text: str = "pi-1:s3cret:with:colons\n", mode: int = 0o600) -> Path:
    path = folder / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_full_file_loads_with_paths_relative_to_its_folder(tmp_path: Path) -> None:
    _credentials(tmp_path)
    path = _write(
        tmp_path,
        BASE.replace("mqtt://", "mqtts://")
        + 'credentials = "credentials"\nca_file = "/etc/ca.crt"\nmemory_cap_mb = 512\n'
        'max_samples = 40\nseed = 3\nmax_message_bytes = 65536\nresend_after = 5\nengine = "torch"\n',
    )
    config = device_config(path)
    assert config.data == tmp_path / "data" and config.state == tmp_path / "state"
    assert config.outbox_dir == tmp_path / "state" / "outbox"
    assert config.ca_file == Path("/etc/ca.crt")
    assert (config.memory_cap_mb, config.max_samples, config.seed) == (512.0, 40, 3)
    assert (config.max_message_bytes, config.resend_after, config.engine) == (65536, 5.0, "torch")
    url = config.broker_url()
    assert (url.scheme, url.username, url.password) == ("mqtts", "pi-1", "s3cret:with:colons")
    assert "s3cret" not in str(url)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "seed = 3\n")
    config = device_config(path, {"device_id": "pi-9", "seed": None, "state": "/srv/x", "broker": None})
    assert config.device_id == "pi-9" and config.state == Path("/srv/x")
    assert config.seed == 3 and config.broker == "mqtt://127.0.0.1:1"  # not given: the file's
    with pytest.raises(ConfigError, match=r"^--max-samples: expected a positive integer"):
        device_config(path, {"max_samples": 0})


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ('"mqtt://127.0.0.1:1"', '"http://x"'),
            "edge.toml: key 'broker': expected mqtt://host:port or mqtts://host:port, got 'http://x'",
        ),
        (
            ('"mqtt://127.0.0.1:1"', '"mqtt://u:pw@h:1"'),
            "edge.toml: key 'broker': put the password in the credentials file",
        ),
        (('"lab"', '"a/b"'), "edge.toml: key 'fleet': 'a/b'"),
        (('"pi-1"', '"pi+1"'), "edge.toml: key 'device_id': 'pi+1'"),
        (('"data"', "3"), "edge.toml: key 'data': expected a path"),
        (('state = "state"', "memory_cap_mb = 1024"), "edge.toml: key 'state' is missing"),
        (('fleet = "lab"', 'seed = "lab"'), "edge.toml: key 'fleet' is missing"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = _write(tmp_path, BASE.replace(*edit))
    with pytest.raises(ConfigError) as exc:
        device_config(path)
    assert str(exc.value).startswith(message), exc.value
    assert "pw" not in str(exc.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "memory_cap_mb = 0",
            "edge.toml: key 'memory_cap_mb': expected a number of MiB, at least 64, got 0.0",
        ),
        ('memory_cap_mb = "1G"', "edge.toml: key 'memory_cap_mb': expected a number, got '1G'"),
        ("max_samples = true", "edge.toml: key 'max_samples': expected a positive integer, got True"),
        ("seed = 1.5", "edge.toml: key 'seed': expected an integer, got 1.5"),
        ("resend_after = -1", "edge.toml: key 'resend_after': expected a non-negative number"),
        ('engine = "gpu"', "edge.toml: key 'engine': expected one of auto, torch, ort, ort-plain, got 'gpu'"),
        ('ca_file = "ca.crt"', "edge.toml: key 'ca_file': TLS files need an mqtts:// broker"),
        ('credentials = "c"\nbroker_user = 1', "edge.toml: unknown key 'broker_user'"),
        ("devise_id = 1\nmemory = 2", "edge.toml: unknown keys 'devise_id', 'memory'"),
        ("[edge]\nfleet = 1", "edge.toml: unknown key 'edge'"),
        ("fleet = ", "edge.toml: not valid TOML"),
    ],
)
def test_more_bad_values(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        device_config(_write(tmp_path, BASE + extra + "\n"))
    assert str(exc.value).startswith(message), exc.value


def test_a_client_certificate_needs_both_files(tmp_path: Path) -> None:
    text = BASE.replace("mqtt://", "mqtts://") + 'cert_file = "c.crt"\n'
    with pytest.raises(ConfigError, match=r"^edge.toml: key 'key_file': is missing"):
        device_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"^--key-file: is missing"):
        DeviceConfig(broker="mqtts://h:1", fleet="f", device_id="d", data=Path("x"), cert_file=Path("c"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_a_credentials_file_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    path = _credentials(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as exc:
        read_credentials(path, "edge.toml: key 'credentials'")
    text = str(exc.value)
    assert text.startswith("edge.toml: key 'credentials':") and f"mode {mode:04o}" in text
    assert "chmod 600" in text and "s3cret" not in text


@pytest.mark.parametrize("text", ["", "no-colon\n", ":pw\n", "a:b\nc:d\n"])
def test_a_malformed_credentials_file_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must hold one line user:password") as exc:
        read_credentials(_credentials(tmp_path, text))
    assert "pw" not in str(exc.value) and "no-colon" not in str(exc.value)


def test_comments_and_a_0400_mode_are_fine(tmp_path: Path) -> None:
    assert read_credentials(_credentials(tmp_path, "# broker login\nu:p\n", 0o400)) == ("u", "p")


def _run_edge(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(["edge", *argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "text, flags, fragment",
    [
        (BASE.replace("mqtt://127.0.0.1:1", "http://x"), [], "edge.toml: key 'broker': expected mqtt://"),
        (BASE + "verbose = true\n", [], "edge.toml: unknown key 'verbose'"),
        (BASE, ["--data", "/nonexistent/folder"], "--data: no such folder: /nonexistent/folder"),
        (BASE, [], "edge.toml: key 'data': no such folder"),
        (BASE.replace('"data"', '"."') + 'credentials = "credentials"\n', [], "mode 0644"),
        (BASE, ["--memory-cap-mb", "10"], "--memory-cap-mb: expected a number of MiB, at least 64"),
    ],
)
def test_fedpeft_edge_exits_2_with_one_line_on_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[str], fragment: str
) -> None:
    _credentials(tmp_path, mode=0o644)
    path = _write(tmp_path, text)
    code, err = _run_edge(["--config", str(path), *flags], capsys)
    assert code == 2, err
    assert err.splitlines() == [err] and err.startswith("fedpeft edge: error: ") and fragment in err


def test_without_a_file_the_four_flags_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_edge(["--fleet", "f", "--device-id", "d", "--data", "x"], capsys)
    assert code == 2 and err == "fedpeft edge: error: --broker is required (or give --config FILE)"


def test_an_unreachable_broker_exits_75_so_systemd_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_text_folder(tmp_path / "data", per_class_train=2)
    _credentials(tmp_path)
    path = _write(tmp_path, BASE + 'credentials = "credentials"\nengine = "torch"\n')
    code, err = _run_edge(["--config", str(path)], capsys)  # port 1: nothing listens
    assert code == EX_TEMPFAIL == 75, err
    assert "cannot reach MQTT broker mqtt://pi-1:***@127.0.0.1:1" in err and "s3cret" not in err


# --- the systemd unit and the example configuration ---------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values]}}, by systemd's syntax rules.

    Comments start with '#' or ';' at the start of a line; a line ending in a backslash continues
    on the next; a key may repeat (its values accumulate, an empty assignment resets the list).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        assert "=" in line, f"not key=value: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        values = current.setdefault(key, [])
        if value:
            values.append(value)
        else:
            values.clear()
    return sections


def _mib(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"K": 2**-10, "": 2**-20, "M": 1, "G": 2**10, "T": 2**20}[unit]


def test_the_parser_follows_systemds_rules() -> None:
    unit = parse_unit("[Service]\n# c\n; c\nA=1\nA=2\nB=x \\\n  y\nA=\nA=3\n")
    assert unit == {"Service": {"A": ["3"], "B": ["x y"]}}


def test_the_unit_runs_fedpeft_edge_as_a_service_that_restarts_and_keeps_its_state() -> None:
    unit = parse_unit(UNIT.read_text())
    u, s, i = unit["Unit"], unit["Service"], unit["Install"]
    assert u["After"] == ["network-online.target"] and u["Wants"] == ["network-online.target"]
    exec_start = s["ExecStart"][0].split()
    assert exec_start[0].endswith("/fedpeft") and exec_start[0].startswith("/")
    assert exec_start[-3:] == ["edge", "--config", "/etc/fedpeft/edge.toml"]
    assert s["User"] == ["fedpeft"] and s["User"] != ["root"]
    assert s["Restart"] == ["on-failure"] and _seconds(s["RestartSec"][0]) >= 1
    assert s["RestartPreventExitStatus"] == ["2"]  # a bad file is not retried; 75 (no broker) is
    assert s["StateDirectory"] == ["fedpeft-edge"]
    assert i["WantedBy"] == ["multi-user.target"]
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ]:
        assert s[key] == [value], key
    assert "MemoryDenyWriteExecute" not in s  # would break the engines' JIT kernels
    # the example configuration matches the unit: its state is the StateDirectory (a writable
    # folder under ProtectSystem=strict, where the outbox survives restarts), and MemoryMax sits
    # a bit above the training cap: the guard trips and retries before the kernel's OOM killer
    config = device_config(EXAMPLE)
    assert config.state == Path("/var/lib") / s["StateDirectory"][0]
    assert config.outbox_dir == Path("/var/lib/fedpeft-edge/outbox")
    assert config.memory_cap_mb is not None
    memory_max = _mib(s["MemoryMax"][0])
    assert config.memory_cap_mb < memory_max <= 1.5 * config.memory_cap_mb + 256
    assert memory_max == config.memory_cap_mb + max(256, 0.25 * config.memory_cap_mb)  # the rule stated
    assert config.credentials == Path("/etc/fedpeft/credentials") and config.ca_file is not None


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing_but_the_known(tmp_path: Path) -> None:
    # the known: RestartSteps/RestartMaxDelaySec are unknown before systemd 254, and the venv's
    # fedpeft does not exist on this machine
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    known = ("Unknown key 'RestartSteps'", "Unknown key 'RestartMaxDelaySec'", "is not executable")
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not any(k in line for k in known)] == [], lines


def test_without_tomllib_or_tomli_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.10 has no tomllib: the tomli backport is used if installed, else one clear line
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(
        ConfigError, match=r"^edge.toml: reading --config needs Python 3.11 .*pip install tomli"
    ):
        device_config(_write(tmp_path, BASE))


# --- a restarted service resumes from its state folder's outbox -------------------------------------


def test_a_restarted_edge_service_resends_its_outbox_from_the_configured_state(
    mosquitto_factory: Any, tmp_path: Path
) -> None:
    # the service was stopped (or killed) after sending round 4's update and before its ack came:
    # the update is in STATE/outbox. Started again with the same edge.toml, it sends it again first,
    # logs in with the credentials file's user, and forgets the update once it is acknowledged.
    broker = mosquitto_factory(users={"pi-1": "s3cret", "watcher": "w"})
    write_text_folder(tmp_path / "data", per_class_train=2)
    _credentials(tmp_path, "pi-1:s3cret\n")
    text = BASE.replace("mqtt://127.0.0.1:1", broker.url) + 'credentials = "credentials"\nengine = "torch"\n'
    path = _write(tmp_path, text)
    topic = wire.topic("lab", "update", "pi-1")
    Outbox(device_config(path).outbox_dir).put(4, topic, b"the update of round 4")
    assert sorted(p.name for p in (tmp_path / "state" / "outbox").iterdir()) == [
        "update-4.bin",
        "update-4.topic",
    ]

    seen: list[bytes] = []
    watcher = MqttTransport(
        parse_broker_url(broker.url_for("watcher")), client_id="watcher", clean_start=True
    )
    watcher.connect()
    watcher.subscribe(topic, lambda _t, payload: seen.append(payload))
    edge = subprocess.Popen(
        [sys.executable, "-m", "sdk.cli", "edge", "--config", str(path)],
        cwd="/",  # as under systemd: nothing may depend on the working directory
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait(lambda: seen == [b"the update of round 4"], 60), seen
        ack = wire.Ack(device_id="pi-1", round=4, content_id="x", accepted=True)
        watcher.publish(wire.topic("lab", "ack", "pi-1"), wire.encode_ack(ack), qos=1)
        assert _wait(lambda: not any((tmp_path / "state" / "outbox").glob("update-4.*")), 20)
        edge.send_signal(signal.SIGTERM)  # systemctl stop
        out, _ = edge.communicate(timeout=20)
    finally:
        if edge.poll() is None:
            edge.kill()
        watcher.close()
    assert edge.returncode == 0, out
    assert "(1 unacknowledged update to resend)" in out and f"state {tmp_path / 'state'}" in out
    assert "s3cret" not in out and "pi-1:***@" in out
    assert "0 updates sent, 1 accepted" in out  # the ack counted for the update sent before the restart


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_data_from_the_flag_may_still_name_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_text_folder(tmp_path / "named" / "shopdata", per_class_train=1)
    monkeypatch.setenv("FEDPEFT_DATASETS", str(tmp_path / "named"))
    flags = {"broker": "mqtt://h:1", "fleet": "f", "device_id": "d"}
    device_config(None, flags | {"data": "shopdata"}).check_files()  # as `--data shopdata` always did
    with pytest.raises(ConfigError, match=r"^--data: no such folder: nodata$"):
        device_config(None, flags | {"data": "nodata"}).check_files()
