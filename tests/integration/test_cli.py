"""The ``airi`` CLI against the session's app (``up`` and ``down`` run in ``make demo``)."""

from __future__ import annotations

import io
import json

import psutil

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
    assert "ingress replicas, proxy: haproxy)" in out


def test_status_names_the_proxy_that_serves(capsys) -> None:
    """The default front door is Serve's HAProxy with two ingress replicas, and status says
    so; the HAProxy process really runs on the (local) cluster."""
    assert cli.main(["status", "--json"]) == 0
    ingress = json.loads(capsys.readouterr().out)["ingress"]
    assert ingress["proxy"] == "haproxy" and ingress["replicas"] == 2
    haproxy = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"]
    assert haproxy, "no haproxy process serves the ingress"


def test_chat_reads_stdin_lines(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("How do returns work?\nAnd shipping?\n"))
    assert cli.main(["chat", "--api-key", KEY, "--model", "tiny-chat", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny-chat> ") == 2


def test_chat_with_a_wrong_key_fails_cleanly(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli.main(["chat", "--api-key", "sk-wrong-wrong-wrong", "--model", "tiny-chat"]) == 2
    assert "malformed API key" in capsys.readouterr().err


def test_keys_are_created_used_listed_and_revoked_without_a_restart(capsys, airi_app) -> None:
    import httpx
    import ray

    from tests.conftest import wait_for

    assert cli.main(["keys", "create", "--tenant", "tenant-b"]) == 0
    key = capsys.readouterr().out.strip()
    key_id = key.split("-")[2]

    def chat_status() -> int:
        return httpx.post(
            f"{airi_app.base_url}/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).status_code

    assert wait_for(lambda: chat_status() == 200, timeout=30, what="the new key to work")
    assert cli.main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    mine = next(k for k in listed if k["key_id"] == key_id)
    assert mine["tenant"] == "tenant-b" and mine["source"] == "cli" and not mine["revoked_at"]
    assert key not in json.dumps(listed)
    # Only salted hashes are stored: neither this key nor the spec's keys appear in the KV.
    for name in (b"airi/app_spec", b"airi/api_keys"):
        stored = ray.experimental.internal_kv._internal_kv_get(name).decode()
        assert key not in stored and KEY not in stored

    assert cli.main(["keys", "revoke", key_id]) == 0
    assert wait_for(lambda: chat_status() == 401, timeout=30, what="the revoked key to fail")
    assert cli.main(["keys", "create", "--tenant", "nobody"]) == 2
    assert "no tenant 'nobody'" in capsys.readouterr().err


def test_rollout_and_rollback_errors_are_clear(capsys) -> None:
    assert cli.main(["rollout", "tiny-chat", "--to", "9"]) == 2
    assert "model 'tiny-chat' has no version '9'; known versions: 1" in capsys.readouterr().err
    assert cli.main(["rollout", "tiny-chat", "--to", "1"]) == 2
    assert "already serves version '1'" in capsys.readouterr().err
    assert cli.main(["rollout", "tiny-chat", "--to", "2", "--steps", "10,x"]) == 2
    assert "--steps takes comma-separated percentages" in capsys.readouterr().err
    assert cli.main(["rollout", "tiny-chat", "--to", "2", "--with", "minilm"]) == 2
    assert "--with takes MODEL=VERSION" in capsys.readouterr().err
    assert cli.main(["rollback", "tiny-chat"]) == 2
    assert "no rollout running and no earlier version" in capsys.readouterr().err
    assert cli.main(["deploy", "/nonexistent.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
