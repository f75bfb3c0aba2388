"""The cluster `airi up` starts is locked down: job submissions without its token are
refused, and the job API answers with it.

This test starts and stops its own Ray cluster, so it runs before the session's cluster
exists (see ``pytest_collection_modifyitems`` in conftest) and skips if another Ray
cluster already runs on this machine.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from airi_ray import cli
from tests.conftest import wait_for

DASHBOARD = "http://127.0.0.1:8265"


def _submit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli._ray_cli(), "job", "submit", "--address", DASHBOARD, "--", "echo", "hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _outside_ip() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.own_cluster
def test_job_submissions_without_the_token_are_refused(tmp_path: Path) -> None:
    if cli._ray_running():
        pytest.skip("a Ray cluster already runs on this machine")
    cli._start_ray(None, 1)
    try:
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        wait_for(
            lambda: _get(f"{DASHBOARD}/api/jobs/") == 401, timeout=60, what="the job API to answer"
        )
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        elsewhere = clean | {"HOME": str(tmp_path)}  # no token file to be found
        for env, why in [
            (elsewhere, "no token"),
            (elsewhere | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}, "a wrong token"),
            (elsewhere | {"RAY_AUTH_MODE": "token"}, "token mode without a token"),
        ]:
            refused = _submit(env)
            assert refused.returncode != 0, (why, refused.stdout[-500:])
            assert "hello" not in refused.stdout, why
        # With the token the job API answers (listing, not running a job, keeps this fast).
        listed = subprocess.run(
            [cli._ray_cli(), "job", "list", "--address", DASHBOARD],
            capture_output=True,
            text=True,
            env=clean | {"RAY_AUTH_MODE": "token"},
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        ip = _outside_ip()
        if ip is not None:  # the dashboard listens on loopback only
            assert _get(f"http://{ip}:8265/api/jobs/") is None
    finally:
        subprocess.run([cli._ray_cli(), "stop", "--force"], capture_output=True, timeout=120)


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None
