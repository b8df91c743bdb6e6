"""The service's SQLite state survives a reopen and keeps one update per device and round."""

from __future__ import annotations

from pathlib import Path

from broker_server.state import StateStore


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s" / "state.sqlite"
    store = StateStore(path)
    store.save_device("d1", b"hello-bytes", 1.0)
    store.save_global(3, "abc", b"global-3")
    assert store.add_update(3, "d1", "c1", b"u1")
    assert not store.add_update(3, "d1", "c2", b"u1-again")  # one per device and round
    store.save_round_record(3, {"round": 3, "accuracy": 0.5})
    store.set_meta("phase", "train")
    store.add_rejection("d1", 3, "malformed: bad magic", 2.0, counters={"bytes_up_total": 9})
    store.add_update(4, "d1", "c4", b"u4", counters={"bytes_up_total": 11}, device_counters={"bytes_up": 4})
    store.add_rejection(None, None, "malformed: bad topic", 3.0)  # the counters stay as they were
    store.close()

    again = StateStore(path)
    assert again.devices() == {"d1": b"hello-bytes"}
    assert again.latest_global() == (3, "abc", b"global-3")
    assert again.updates(3) == [("d1", "c1", b"u1")]
    assert again.round_records() == [{"round": 3, "accuracy": 0.5}]
    assert again.get_meta("phase") == "train"
    assert again.get_meta("round") == 3
    assert again.get_meta("missing", 7) == 7
    assert again.rejections() == [
        {"client": "d1", "round": 3, "reason": "malformed: bad magic"},
        {"client": None, "round": None, "reason": "malformed: bad topic"},
    ]
    assert again.counters() == {"bytes_up_total": 11}
    assert again.device_counters() == {"d1": {"bytes_up": 4}}
