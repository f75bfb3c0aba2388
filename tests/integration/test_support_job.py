"""`ray job submit --working-dir . -- python -m deployments.support_assistant` against a
local cluster that `airi up`'s way of starting Ray locks down (token authentication): the
job deploys the assistant's spec and holds its scripted conversation.

It starts and stops its own Ray cluster (so it runs before the session's, see conftest) and
skips if another Ray cluster already runs on this machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from airi_ray import cli

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = "http://127.0.0.1:8265"


@pytest.mark.own_cluster
@pytest.mark.showcase
def test_the_assistant_runs_as_a_ray_job() -> None:
    if cli._ray_running():
        pytest.skip("a Ray cluster already runs on this machine")
    cli._start_ray(None, 4)
    try:
        job = subprocess.run(
            [cli._ray_cli(), "job", "submit", "--address", DASHBOARD, "--working-dir", "."]
            + ["--", "python", "-m", "deployments.support_assistant"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=os.environ | {"RAY_AUTH_MODE": "token"},
            timeout=900,
        )
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "succeeded" in out, out[-4000:]
        answers = [line for line in out.splitlines() if line.startswith("A: ")]
        assert len(answers) == 3, out[-4000:]
        assert out.count("sources: ") == 3
        assert "4111" not in "\n".join(answers)
    finally:
        cli.main(["down"])  # the app first (replicas stop their engines), then the cluster
