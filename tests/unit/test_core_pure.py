"""The core imports nothing of Ray, asyncio, the network or the disk."""

import subprocess
import sys


def test_core_is_pure() -> None:
    code = (
        "import sys, airi_ray.core, airi_ray.core.scheduling, airi_ray.core.requests, airi_ray.core.stats;"
        "bad = [m for m in ('ray', 'asyncio', 'vllm', 'lancedb', 'socket', 'torch') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
