"""Real Mosquitto brokers for integration tests, each on a free port with its own configuration.

``Mosquitto(folder, ...)`` writes ``mosquitto.conf`` (and, when asked, a password file and an ACL
file) into ``folder``, starts ``mosquitto -c`` and waits until the port accepts connections.
Lines in ``extra_config`` follow the listener line, so listener options such as ``cafile``,
``certfile``, ``keyfile`` and ``require_certificate`` apply to it (a TLS test needs only those).

A missing ``mosquitto`` binary fails the test instead of skipping it: a CI run that silently
skipped every broker test would pass without testing the transport at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

INSTALL_HINT = "install Debian's mosquitto package (apt-get install mosquitto); CI must not skip broker tests"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin"):  # sbin is often not on PATH
            if Path(folder, name).is_file():
                return str(Path(folder, name))
        _fail(f"{name} is not installed: {INSTALL_HINT}")
    return found


def mosquitto_binary() -> str:
    """The mosquitto executable; fails (never skips) when it is missing."""
    return _which("mosquitto")


def wait_listening(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Mosquitto:
    """One mosquitto process with a config written into ``folder``.

    ``users`` (name -> password) writes a password file and turns anonymous access off unless
    ``anonymous=True`` is given explicitly; ``acl`` lines (``user dev1``, ``topic write fl/+/update/dev1``,
    ``pattern read fl/%c/#``...) go to an ACL file.
    """

    def __init__(
        self,
        folder: Path,
        extra_config: Sequence[str] = (),
        *,
        anonymous: bool | None = None,
        users: Mapping[str, str] | None = None,
        acl: Sequence[str] | None = None,
        port: int | None = None,
        start_timeout: float = 10.0,
        persistence: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = list(extra_config)
        self.users = dict(users or {})
        self.anonymous = (not self.users) if anonymous is None else anonymous
        self.acl = list(acl) if acl is not None else None
        self.start_timeout = start_timeout
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        self.password_file = self.folder / "passwords"
        self.acl_file = self.folder / "acl"

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` (anonymous; put credentials in yourself)."""
        return f"mqtt://127.0.0.1:{self.port}"

    def url_for(self, user: str, scheme: str = "mqtt") -> str:
        """The URL with ``user`` and its password from ``users``."""
        return f"{scheme}://{user}:{self.users[user]}@127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            *self.extra_config,
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            "persistence true" if self.persistence else "persistence false",
            f"persistence_location {self.folder}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # as root mosquitto drops to user "mosquitto", which cannot read pytest's 0700 tmp dirs
            lines.append("user root")
        if self.users:
            self.password_file.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [_which("mosquitto_passwd"), "-b", str(self.password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            self.password_file.chmod(0o600)  # mosquitto 2 warns about readable password files
            lines.append(f"password_file {self.password_file}")
        if self.acl is not None:
            self.acl_file.write_text("\n".join(self.acl) + "\n")
            self.acl_file.chmod(0o600)
            lines.append(f"acl_file {self.acl_file}")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        """Write the config, start the broker and wait until it accepts connections."""
        if self.running:
            return self
        self._write_config()
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                _fail(f"mosquitto exited at start; its log:\n{self.log_text()}")
            if wait_listening(self.port, 0.2):
                return self
        self.stop()
        _fail(f"mosquitto did not listen on {self.port} within {self.start_timeout:g} s:\n{self.log_text()}")

    def stop(self) -> None:
        """Terminate the broker (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def restart(self) -> Mosquitto:
        """Stop and start again on the same port (persistence off: sessions and retained are lost)."""
        self.stop()
        return self.start()

    def log_text(self, tail: int = 4000) -> str:
        """The end of the broker's log."""
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
