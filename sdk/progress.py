"""Progress bars for people who wait: one bar per round with accuracy and bytes moved."""

from __future__ import annotations

import sys
from typing import Any


class RoundProgress:
    """A tqdm bar per round that fills as updates are accepted and closes with the round's figures."""

    def __init__(self, clients: int, rounds: int, *, first: int = 0, enabled: bool = True) -> None:
        self.clients = clients
        self.rounds = rounds
        self.enabled = enabled
        self._bar: Any = None
        self._round = first  # the number of the first round (1 when there is no class-mean round 0)
        self._moved = 0

    def _open(self) -> None:
        if self._bar is None and self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.clients,
                desc=f"round {self._round}/{self.rounds}",
                unit="update",
                leave=True,
                dynamic_ncols=True,
            )

    def update(self, device: str) -> None:
        """One more accepted update."""
        self._open()
        if self._bar is not None:
            self._bar.update(1)

    def round_done(self, record: dict[str, Any]) -> None:
        """Close the round's bar with its accuracy and bytes."""
        self._open()
        self._moved += int(record["bytes_up"]) + int(record["bytes_down"])
        acc = record.get("accuracy")
        text = f"acc {acc:.3f}" if acc is not None else "acc n/a"
        if record.get("exact_match") is not None:  # question answering
            text = f"EM {record['exact_match']:.3f}, F1 {record['f1']:.3f}"
        if self._bar is not None:
            self._bar.set_postfix_str(f"{text}, {self._moved / 1e6:.2f} MB moved")
            self._bar.close()
            self._bar = None
        else:
            print(f"round {record['round']}: {text}, {self._moved / 1e6:.2f} MB moved", file=sys.stderr)
        self._round = int(record["round"]) + 1

    def close(self) -> None:
        """Close any open bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
