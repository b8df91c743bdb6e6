"""Throwaway certificates for TLS tests, made with the ``openssl`` command line.

``make_pki(folder)`` writes a CA, a server certificate for 127.0.0.1 and a client certificate
signed by that CA, plus a second, unrelated CA with its own client certificate (an impostor).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key.name,
        "-out",
        cert.name,
        cwd=folder,
    )
    return cert, key


def _signed(folder: Path, name: str, cn: str, ca: tuple[Path, Path], san: str | None) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={cn}",
        "-keyout",
        key.name,
        "-out",
        csr.name,
        cwd=folder,
    )
    args = [
        "x509",
        "-req",
        "-in",
        csr.name,
        "-CA",
        ca[0].name,
        "-CAkey",
        ca[1].name,
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        cert.name,
    ]
    if san is not None:
        ext = folder / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n")
        args += ["-extfile", ext.name]
    _openssl(*args, cwd=folder)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """CA, server (127.0.0.1), client ``dev1`` and an impostor signed by another CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is needed to make test certificates", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    server = _signed(folder, "server", "127.0.0.1", ca, "IP:127.0.0.1,DNS:localhost")
    client = _signed(folder, "client", "dev1", ca, None)
    rogue_ca = _ca(folder, "rogue-ca")
    rogue = _signed(folder, "rogue", "dev1", rogue_ca, None)
    return Pki(ca[0], *server, *client, rogue_ca[0], *rogue)
