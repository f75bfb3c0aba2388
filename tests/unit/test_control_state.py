"""The controller's durable documents: latest value wins, deletes, reload, compaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from airi_ray.data import control
from airi_ray.data.control import ControlState


def test_latest_value_survives_a_reload(tmp_path: Path) -> None:
    uri = str(tmp_path / "state")
    state = ControlState(uri)
    assert state.load() == {}
    assert state.save({"models/a": {"stable": "v1"}, "rollout/a": {"step": 0}})
    assert state.save({"models/a": {"stable": "v2"}})
    assert not state.save({"models/a": {"stable": "v2"}})  # unchanged: no commit
    assert state.save({"rollout/a": None})  # deleted
    again = ControlState(uri).load()
    assert again == {"models/a": {"stable": "v2"}}


def test_compaction_keeps_only_the_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "COMPACT_EVERY", 5)
    uri = str(tmp_path / "state")
    state = ControlState(uri)
    for i in range(12):
        state.save({"counter": i, f"k{i % 3}": i})
    reloaded = ControlState(uri)
    assert reloaded.load() == {"counter": 11, "k0": 9, "k1": 10, "k2": 11}
    assert reloaded._table.count_rows() < 12 * 2
    reloaded.save({"counter": 12})  # sequence numbers continue after a reload
    assert ControlState(uri).load()["counter"] == 12


def test_memory_only() -> None:
    state = ControlState(None)
    state.save({"a": [1, 2]})
    assert state.load() == {"a": [1, 2]}
