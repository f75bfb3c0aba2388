"""The ``airi`` CLI against the session's app (``up`` and ``down`` run in ``make demo``)."""

from __future__ import annotations

import io
import json

from airi_ray import cli
from tests.conftest import KEY


def test_status_json(capsys) -> None:
    assert cli.main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in status["models"]} == {"tiny-chat", "minilm"}


def test_status_table(capsys) -> None:
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "tiny-chat" in out and "REPLICA" in out


def test_chat_reads_stdin_lines(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("How do returns work?\nAnd shipping?\n"))
    assert cli.main(["chat", "--api-key", KEY, "--model", "tiny-chat", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny-chat> ") == 2


def test_chat_with_a_wrong_key_fails_cleanly(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli.main(["chat", "--api-key", "sk-wrong-wrong-wrong", "--model", "tiny-chat"]) == 2
    assert "invalid API key" in capsys.readouterr().err
