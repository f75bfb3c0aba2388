"""Execute the notebooks in place, with their outputs saved, on a local airi cluster.

    .venv/bin/python notebooks/run.py                  # or: make notebooks
    .venv/bin/python notebooks/run.py --only scheduling
    .venv/bin/python notebooks/run.py --keep           # leave the cluster running after

Order: quickstart, support_assistant, scheduling. The first two need a Ray cluster: unless
one runs already, this starts one with ``airi up --config deployments/quickstart.yaml``
(a local Ray head locked down as ``airi up`` does, and the quickstart app) and stops it
with ``airi down`` at the end, even after a failure. A cluster that was already running is
used as it is and left running (``airi down`` would stop every Ray process of the
machine). ``scheduling`` only reads benchmark results: ``--only scheduling`` starts
nothing.

Each notebook runs in a fresh kernel of this virtual env's Python, with the repo root as
working directory. A notebook whose cell fails is saved with the outputs up to that cell;
the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = ROOT / ".venv"
ORDER = ("quickstart", "support_assistant", "scheduling")
NEEDS_CLUSTER = {"quickstart", "support_assistant"}
CLUSTER_SPEC = "deployments/quickstart.yaml"
CELL_TIMEOUT_S = 600
KERNEL = "python3"


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ray_running() -> bool:
    """Whether a Ray cluster answers on this machine (as ``airi up`` checks it)."""
    beside = Path(sys.executable).with_name("ray")
    cmd = [str(beside) if beside.exists() else "ray", "status"]
    env = os.environ | {"RAY_ADDRESS": "auto"}
    return subprocess.run(cmd, capture_output=True, env=env).returncode == 0


def airi(*args: str) -> int:
    """Run the ``airi`` command of this env from the repo root; its output goes through."""
    return subprocess.run([sys.executable, "-m", "airi_ray.cli", *args], cwd=ROOT).returncode


def kernel_python() -> str | None:
    """The Python that Jupyter's ``python3`` kernel would run, as given in its spec.

    The spec ipykernel installs in this env says ``python``, which jupyter_client runs as
    ``sys.executable`` (this interpreter): that maps to this file's Python too.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    except NoSuchKernel:
        return None
    aliases = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info)}
    return sys.executable if argv0 in aliases else os.path.abspath(argv0)


def ensure_kernel() -> None:
    """Make the ``python3`` kernel run this interpreter (the venv's Python).

    When another ``python3`` spec shadows the env's own (``$JUPYTER_PATH``, or a user's
    spec naming another Python), a private spec naming this interpreter goes first on
    ``$JUPYTER_PATH`` for this process and its kernels; nothing is installed.
    """
    found = kernel_python()
    if found == os.path.abspath(sys.executable):
        return
    kernels = Path(tempfile.mkdtemp(prefix="airi-jupyter-"))
    (kernels / "kernels" / KERNEL).mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    (kernels / "kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(kernels), os.environ.get("JUPYTER_PATH")) if p
    )
    print(f"the {KERNEL} kernelspec runs {found}: using {sys.executable} instead", flush=True)
    assert kernel_python() == os.path.abspath(sys.executable)


def execute(name: str) -> bool:
    """Run one notebook in place; saved with its outputs whether it succeeds or not."""
    import nbformat
    from nbclient import NotebookClient

    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}
    )
    print(f"\n== {path.relative_to(ROOT)} ==", flush=True)
    start = time.perf_counter()
    ok = True
    try:
        client.execute()
    except Exception as e:  # a failing cell, a timeout or a dead kernel
        ok = False
        print(f"FAILED: {type(e).__name__}: {str(e).strip()[-2000:]}", file=sys.stderr)
    finally:
        nbformat.write(nb, path)  # the client fills in `nb` as cells run
    print(f"{'ran' if ok else 'saved (failed)'} {name} in {time.perf_counter() - start:.0f} s")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        type=lambda name: name.removesuffix(".ipynb"),
        choices=ORDER,
        metavar="NAME",
        help=f"run only this notebook (repeatable): {', '.join(ORDER)}",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the cluster this started running"
    )
    args = parser.parse_args()
    if not in_venv() and (VENV / "bin" / "python").exists():
        python = str(VENV / "bin" / "python")
        os.execv(python, [python, __file__, *sys.argv[1:]])
    names = [n for n in ORDER if args.only is None or n in args.only]
    missing = [n for n in names if not (HERE / f"{n}.ipynb").exists()]
    if missing:
        sys.path.insert(0, str(HERE))
        from build import build

        build(missing)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ensure_kernel()

    started = False
    results: dict[str, bool] = {}
    try:
        if NEEDS_CLUSTER & set(names):
            if ray_running():
                print("a Ray cluster is running: the notebooks use it and leave it running")
            else:
                from airi_ray.models.tiny import ensure_tiny_model

                ensure_tiny_model()
                started = True  # from here on, stop it whatever happens
                if airi("up", "--config", CLUSTER_SPEC) != 0:
                    print("`airi up` failed", file=sys.stderr)
                    return 1
        for name in names:
            results[name] = execute(name)
    finally:
        if started and args.keep:
            print("\nthe cluster keeps running; stop it with `airi down`")
        elif started:
            print()
            airi("down")
    print("\n" + "  ".join(f"{n}: {'ok' if ok else 'FAILED'}" for n, ok in results.items()))
    return 0 if results and all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
