"""A real MQTT broker of the simulator's own, so that ``fedpeft simulate`` needs nothing else.

:class:`BrokerProcess` (what ``simulate`` starts) runs Mosquitto where it is installed, else amqtt,
in a process of its own. :class:`EmbeddedBroker` is amqtt on a thread of the calling process.

The broker runs on its own thread with its own asyncio event loop; anonymous clients, QoS 0-2,
retained messages and payloads up to MQTT's 256 MiB limit (amqtt sets no smaller one). It is meant
for one machine: it binds to 127.0.0.1 by default and keeps nothing on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edge_runtime.errors import TransportError

log = logging.getLogger("fedpeft.broker")

_NOISY_LOGGERS = ("amqtt", "transitions")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """An amqtt broker on its own thread and event loop; use as a context manager.

    ``port=0`` picks a free port. ``quiet`` (default) raises amqtt's loggers to WARNING: at INFO it
    logs every connection and packet.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> None:
        self.host = host
        self.port = port
        self.quiet = quiet
        self._auto_port = port == 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The broker's URL, ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        # amqtt 0.12 format: a "default" listener is required; giving "plugins" replaces the
        # defaults, which also drops the $SYS publisher and the packet/event loggers
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 5.0) -> EmbeddedBroker:
        """Start the broker and wait until it listens; TransportError if it does not within ``timeout``."""
        if self.running:
            return self
        if self.quiet:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        # a port picked for us can be taken by someone else before amqtt binds it: pick again
        for attempt in range(3 if self._auto_port else 1):
            if self._auto_port:
                self.port = free_port(self.host)
            if self._start_once(timeout):
                return self
            if not isinstance(self._error, OSError) or attempt == 2:
                break
        raise TransportError(f"the embedded MQTT broker did not start on {self.url}: {self._error}")

    def _start_once(self, timeout: float) -> bool:
        ready = threading.Event()
        self._error = None

        async def serve() -> None:
            from amqtt.broker import Broker

            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            broker = Broker(self._config())
            try:
                await broker.start()
            except BaseException as exc:  # reported to start(); the thread then ends
                self._error = exc.__cause__ or exc
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await broker.shutdown()

        def run() -> None:
            try:
                asyncio.run(serve())
            except Exception as exc:  # shutdown trouble must not escape a daemon thread silently
                if not ready.is_set():
                    self._error = exc
                    ready.set()
                else:
                    log.debug("embedded broker shutdown failed", exc_info=True)

        thread = threading.Thread(target=run, name=f"embedded-mqtt-broker-{self.port}", daemon=True)
        self._thread = thread
        thread.start()
        if not ready.wait(timeout):
            self._error = TimeoutError(f"not listening after {timeout:g} s")
            self.stop()
            return False
        if self._error is not None:
            thread.join(timeout)
            self._thread = None
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, close the listener and join the broker's thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the embedded MQTT broker on %s did not stop within %g s", self.url, timeout)
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def mosquitto_path() -> str | None:
    """The ``mosquitto`` executable, if this host has one (Debian puts it in /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


class BrokerProcess:
    """A private MQTT broker in a process of its own, for ``fedpeft simulate``.

    Mosquitto where it is installed, else amqtt in a child Python process. Either way the broker
    does not share the simulator's process, whose threads are busy encoding, decoding and
    evaluating: amqtt on a thread there missed its PUBACK deadlines and printed tracebacks.
    Anonymous, bound to 127.0.0.1 on a free port, nothing kept on disk after it stops.
    """

    def __init__(self, host: str = "127.0.0.1", *, prefer: str = "auto") -> None:
        if prefer not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"prefer must be auto, mosquitto or amqtt, not {prefer!r}")
        self.host = host
        self.port = 0
        binary = mosquitto_path() if prefer != "amqtt" else None
        if prefer == "mosquitto" and binary is None:
            raise TransportError("mosquitto is not installed (apt-get install mosquitto)")
        self.kind = "mosquitto" if binary else "amqtt"
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The broker's URL, ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def _command(self, folder: Path) -> list[str]:
        if self._binary is not None:
            lines = [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                "persistence false",
                "max_queued_messages 100000",  # a busy device must not lose what was queued for it
                "log_dest stderr",
                "log_type error",
                "log_type warning",
            ]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                lines.append("user root")  # as root it would drop to "mosquitto", who cannot read here
            conf = folder / "mosquitto.conf"
            conf.write_text("\n".join(lines) + "\n")
            return [self._binary, "-c", str(conf)]
        return [sys.executable, "-m", "sdk.embedded_broker", "--host", self.host, "--port", str(self.port)]

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        """Start the broker and wait until it listens; TransportError if it does not."""
        self._folder = tempfile.TemporaryDirectory(prefix="fedpeft-broker-")
        folder = Path(self._folder.name)
        log_path = folder / "broker.log"
        for _ in range(3):  # a free port can be taken before the broker binds it: pick again
            self.port = free_port(self.host)
            with open(log_path, "wb") as log_file:
                self._proc = subprocess.Popen(
                    self._command(folder),
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _listening(self.host, self.port, 0.2):
                    log.info("embedded %s broker on %s (pid %d)", self.kind, self.url, self._proc.pid)
                    return self
                time.sleep(0.05)
            self.stop(keep_folder=True)
        text = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        self.stop()
        raise TransportError(f"the embedded {self.kind} broker did not start: {text.strip() or 'no output'}")

    def stop(self, *, keep_folder: bool = False) -> None:
        """Stop the broker process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if not keep_folder and self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve_forever(host: str, port: int) -> None:
    """The amqtt child process: serve until terminated."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(host, port):
        while not stop.wait(1.0):
            pass


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="an amqtt broker in this process (for fedpeft simulate)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    ns = parser.parse_args()
    _serve_forever(ns.host, ns.port)
