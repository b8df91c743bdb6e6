"""TLS against real Mosquitto brokers: server verification, passwords over TLS, client certificates.

Certificates are made per test session with the openssl command line (tests/certs.py).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker_server.report import validate_report
from edge_runtime.errors import ConfigError, TransportError
from edge_runtime.transport import MqttTransport, parse_broker_url
from tests.certs import Pki, make_pki
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
USERS = {"server": "server-secret", "dev0": "dev0-secret", "dev1": "dev1-secret"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_lines(pki: Pki, *extra: str) -> list[str]:
    return [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}", *extra]


def _round_trip(transport: MqttTransport, topic: str) -> bytes:
    got: queue.Queue[bytes] = queue.Queue()
    transport.subscribe(topic, lambda t, p: got.put(p), wait=True)
    transport.publish(topic, b"over tls", qos=1, wait=True)
    return got.get(timeout=10)


def test_password_over_tls_and_server_verification(mosquitto_factory: Callable[..., Any], pki: Pki) -> None:
    broker = mosquitto_factory(_tls_lines(pki), users=USERS)
    url = parse_broker_url(broker.url_for("dev0", scheme="mqtts"))
    good = MqttTransport(url, "dev0", clean_start=True, ca_file=str(pki.ca)).connect()
    try:
        assert _round_trip(good, "fl/f/update/dev0") == b"over tls"
    finally:
        good.close()
    # a device that trusts another CA refuses the broker's certificate
    with pytest.raises(TransportError, match=r"(?i)certificate"):
        MqttTransport(url, "dev0", clean_start=True, ca_file=str(pki.rogue_ca), connect_timeout=5).connect()
    # plain MQTT to the TLS listener gets nowhere
    plain = parse_broker_url(broker.url_for("dev0"))
    with pytest.raises(TransportError):
        MqttTransport(plain, "dev0", clean_start=True, connect_timeout=3).connect()
    # the right CA with the wrong password: refused by the broker, with the reason
    wrong = parse_broker_url(f"mqtts://dev0:nope@127.0.0.1:{broker.port}")
    with pytest.raises(TransportError, match=r"(?i)not authori[sz]ed"):
        MqttTransport(wrong, "dev0", clean_start=True, ca_file=str(pki.ca), connect_timeout=5).connect()
    # TLS files with a plain URL are a configuration mistake, said at once
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttTransport(plain, "dev0", ca_file=str(pki.ca))
    with pytest.raises(ConfigError, match="TLS setup"):
        MqttTransport(url, "dev0", ca_file=str(pki.ca.with_name("missing.crt")))


def test_client_certificates_are_identities(mosquitto_factory: Callable[..., Any], pki: Pki) -> None:
    # the certificate's CN becomes the user name, and the ACL pattern binds topics to it
    broker = mosquitto_factory(
        _tls_lines(pki, "require_certificate true", "use_identity_as_username true"),
        anonymous=False,
        acl=["pattern readwrite fl/+/update/%u"],
    )
    url = parse_broker_url(f"mqtts://127.0.0.1:{broker.port}")
    device = MqttTransport(
        url,
        "dev1",
        clean_start=True,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    device.connect()
    try:
        assert _round_trip(device, "fl/f/update/dev1") == b"over tls"
    finally:
        device.close()
    with pytest.raises(TransportError):  # no certificate
        MqttTransport(url, "anon", clean_start=True, ca_file=str(pki.ca), connect_timeout=5).connect()
    with pytest.raises(TransportError):  # a certificate from another CA, same CN
        MqttTransport(
            url,
            "dev1",
            clean_start=True,
            ca_file=str(pki.ca),
            cert_file=str(pki.rogue_cert),
            key_file=str(pki.rogue_key),
            connect_timeout=5,
        ).connect()


def test_serve_and_edge_run_a_round_over_tls_with_passwords(
    mosquitto_factory: Callable[..., Any], pki: Pki, tmp_path: Path
) -> None:
    broker = mosquitto_factory(
        _tls_lines(pki),
        users=USERS,
        acl=[
            "user server",
            "topic readwrite fl/#",
            "pattern write fl/+/update/%u",
            "pattern write fl/+/hello/%u",
            "pattern write fl/+/status/%u",
            "pattern read fl/+/assign/%u",
            "pattern read fl/+/ack/%u",
            "pattern read fl/+/global/#",
        ],
    )
    model = make_tiny_bert(tmp_path / "model")
    data = write_text_folder(tmp_path / "data", per_class_train=8)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    report = tmp_path / "serve.json"
    tls = ["--ca-file", str(pki.ca)]
    cli = [sys.executable, "-m", "sdk.cli"]
    serve = subprocess.Popen(
        [
            *cli,
            "serve",
            "--broker",
            broker.url_for("server", "mqtts"),
            *tls,
            "--fleet",
            "tls",
            "--data",
            str(data),
            "--rounds",
            "1",
            "--min-clients",
            "2",
            "--report",
            str(report),
            "--round-timeout",
            "120",
            "--hello-timeout",
            "60",
            "--model",
            str(model),
            "--seq-len",
            "16",
            "--state",
            str(tmp_path / "state"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    edges = [
        subprocess.Popen(
            [
                *cli,
                "edge",
                "--broker",
                broker.url_for(f"dev{i}", "mqtts"),
                *tls,
                "--fleet",
                "tls",
                "--device-id",
                f"dev{i}",
                "--data",
                str(data),
                "--state",
                str(tmp_path / f"edge{i}"),
                "--max-samples",
                "10",
                "--seed",
                str(i),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        out = serve.communicate(timeout=240)[0]
        edge_out = [e.communicate(timeout=60)[0] for e in edges]
    finally:
        for p in [serve, *edges]:
            if p.poll() is None:
                p.kill()
    assert serve.returncode == 0, out
    assert all(e.returncode == 0 for e in edges), edge_out
    result = json.loads(report.read_text())
    validate_report(result)
    assert [r["participants"] for r in result["rounds"]] == [2, 2]
    assert result["rejected"] == []
    assert "secret" not in json.dumps(result) and "secret" not in out  # passwords are never written
