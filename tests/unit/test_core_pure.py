"""The core imports nothing of Ray, asyncio, the network or the disk: every module of
``airi_ray/core`` is imported in a fresh interpreter, which then holds none of them."""

import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "airi_ray" / "core"
FORBIDDEN = ("ray", "asyncio", "vllm", "lancedb", "socket", "torch")


def _core_modules() -> list[str]:
    root = CORE.parents[1]
    names = []
    for path in sorted(CORE.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_core_module_is_found() -> None:
    modules = _core_modules()
    assert {"airi_ray.core", "airi_ray.core.scheduling", "airi_ray.core.policy"} <= set(modules)
    assert len(modules) > 20


def test_core_is_pure() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {_core_modules()!r}: importlib.import_module(m)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
