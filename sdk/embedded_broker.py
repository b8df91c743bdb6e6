"""A real MQTT broker in-process (amqtt), so that ``fedpeft simulate`` needs nothing else.

The broker runs on its own thread with its own asyncio event loop; anonymous clients, QoS 0-2,
retained messages and payloads up to MQTT's 256 MiB limit (amqtt sets no smaller one). It is meant
for one machine: it binds to 127.0.0.1 by default and keeps nothing on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
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
