"""FedPEFT+ public face: ``EdgeClient`` for apps, the ``fedpeft`` command line, the fleet simulator."""

from __future__ import annotations

from typing import Any

__all__ = ["EdgeClient"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``import sdk`` (e.g. for the CLI's --help) stays fast.
    if name == "EdgeClient":
        from sdk.edge_client import EdgeClient

        return EdgeClient
    raise AttributeError(name)
