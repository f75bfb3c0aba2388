"""The ``airi`` command: ``up``, ``down``, ``status``, ``chat``, ``keys``.

``airi up`` starts a local Ray head (unless one runs or ``--address`` names a cluster),
deploys an app spec and serves the OpenAI-compatible API; ``airi down`` undoes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "deployments/quickstart.yaml"


def _ray_cli() -> str:
    """The ``ray`` command of this Python environment (its bin folder may not be on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _ray_running() -> bool:
    """Whether a Ray cluster answers here: with its token (the clusters `airi up` starts
    require one) or without (a cluster started otherwise)."""
    for auth in ({"RAY_AUTH_MODE": "token"}, {}):
        env = os.environ | {"RAY_ADDRESS": "auto"} | auth
        done = subprocess.run([_ray_cli(), "status"], capture_output=True, text=True, env=env)
        if done.returncode == 0:
            return True
    return False


def _start_ray(resources: str | None, num_cpus: int | None) -> None:
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
    ]
    if resources:
        cmd += ["--resources", resources]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    print("starting a local Ray cluster:", " ".join(cmd), flush=True)
    # Locked down: token authentication on (whatever Ray's default becomes), every port on
    # loopback, and the token readable by its owner only.
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    # Job entrypoints (`ray job submit -- python ...`) run with the cluster's PATH: put this
    # environment's bin folder first, so `python` there is the one airi is installed in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    # `ray start` with token auth needs the token to exist already (ray.init makes one, the
    # CLI does not): on a fresh machine, have Ray generate it first.
    if not token.exists() and not os.environ.get("RAY_AUTH_TOKEN"):
        _run_ray([_ray_cli(), "get-auth-token", "--generate"], env)
    if token.exists():
        token.chmod(0o600)
    _run_ray(cmd, env)


def _run_ray(cmd: list[str], env: dict[str, str]) -> None:
    """Run a Ray CLI command; on failure, raise with the end of what it printed."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
        raise RuntimeError(f"`{' '.join(cmd[1:3])}` failed: " + " / ".join(said))


def cmd_up(args: argparse.Namespace) -> int:
    from airi_ray.app import deploy, init_ray
    from airi_ray.config import load_spec

    spec = load_spec(args.config)
    if args.port is not None:
        spec = spec.model_copy(
            update={"ingress": spec.ingress.model_copy(update={"port": args.port})}
        )
    if args.address is None and not _ray_running():
        _start_ray(args.resources, args.num_cpus)
    init_ray(args.address or "auto")
    print(
        f"deploying {args.config} (models load in the background; this waits until ready)",
        flush=True,
    )
    status = deploy(spec)
    _print_status(status)
    if spec.ingress.enabled:
        print(f"\nOpenAI-compatible API: http://{spec.ingress.host}:{spec.ingress.port}/v1")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from airi_ray.app import init_ray, shutdown

    if _ray_running() or args.address:
        init_ray(args.address or "auto")
        shutdown()
        print("airi app stopped")
    if not args.keep_ray and args.address is None:
        import ray

        ray.shutdown()  # leave the cluster before stopping it, or this process reports its death
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True)
        print("local Ray cluster stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from airi_ray.app import connect

    status = connect(args.address or "auto").status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from airi_ray.app import deploy, init_ray

    init_ray(args.address or "auto")
    print(f"deploying {args.file}", flush=True)
    _print_status(deploy(args.file, wait=not args.no_wait))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from airi_ray.app import connect
    from airi_ray.core.errors import InvalidRequest

    together = {}
    for item in args.with_ or []:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise InvalidRequest(f"--with takes MODEL=VERSION, got {item!r}")
        together[name] = version
    steps = None
    if args.steps:
        try:
            steps = [int(p) for p in args.steps.split(",")]
        except ValueError:
            raise InvalidRequest(
                f"--steps takes comma-separated percentages such as 10,50,100, got {args.steps!r}"
            ) from None
    client = connect(args.address or "auto")
    status = client.rollout(args.model, args.to, args.strategy, steps, together)
    _print_versions(status)
    if args.wait:
        return _follow(client, args.model)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from airi_ray.app import connect

    _print_versions(connect(args.address or "auto").rollback(args.model))
    return 0


def _follow(client: Any, model: str) -> int:
    """Print the rollout's decisions until it finishes; 0 if promoted, 1 if rolled back."""
    seen: set[str] = set()
    while True:
        status = client.status()
        for event in status["events"]:
            if event not in seen and model in event:
                seen.add(event)
                print(event, flush=True)
        m = next((m for m in status["models"] if m["name"] == model), None)
        ro = m and m.get("rollout")
        if not ro or ro.get("outcome") != "running":
            return 0 if ro and ro.get("outcome") == "promoted" else 1
        time.sleep(1.0)


def _print_versions(status: dict[str, Any]) -> None:
    print(
        f"{'MODEL':<20} {'VERSION':<10} {'STATE':<9} {'TRAFFIC':>7} {'READY':>5}/{'REPL':<4} ROLLOUT"
    )
    for m in status["models"]:
        ro = m.get("rollout") or {}
        progress = ""
        if ro.get("outcome") == "running":
            progress = f"{ro.get('strategy')} -> {ro.get('candidate', '')}"
        elif ro:
            progress = f"last: {ro['outcome']} {ro.get('candidate', '')}"
        for i, v in enumerate(m.get("versions", [])):
            print(
                f"{m['name'] if i == 0 else '':<20} {v['version']:<10} {v['state']:<9} "
                f"{100 * v['traffic']:>6.0f}% {v['ready_replicas']:>5}/{v['replicas']:<4} "
                f"{progress if i == 0 else ''}"
            )


def _print_status(status: dict[str, Any]) -> None:
    print(f"app: {status['app']}")
    if ingress := status.get("ingress"):
        print(
            f"http: {ingress['url']} ({ingress['replicas']} ingress replicas, "
            f"proxy: {ingress['proxy'] or 'unknown'})"
        )
    print(
        f"{'MODEL':<20} {'VERSION':<8} {'TASK':<9} {'READY':>5}/{'WANT':<5} {'CTX':>6}  "
        f"{'ACCELERATORS':<16} ERROR"
    )
    for m in status["models"]:
        accels = " ".join(f"{k}x{v}" for k, v in (m.get("accelerators") or {}).items()) or "-"
        problem = m.get("error") or (f"pending: {m['pending']}" if m.get("pending") else "")
        print(
            f"{m['name']:<20} {m['version']:<8} {m['task']:<9} {m['ready_replicas']:>5}/{m['replicas']:<5} "
            f"{m['max_model_len'] or '-':>6}  {accels:<16} {problem}"
        )
    if any(len(m.get("versions", [])) > 1 or m.get("rollout") for m in status["models"]):
        print()
        _print_versions(status)
    if status.get("pools"):
        print(f"\n{'POOL':<8} {'DEVICES':>7} {'USED':>6} {'FREE':>6} {'LEASES':>6} {'FRAG':>5}")
        for kind, p in status["pools"].items():
            print(
                f"{kind:<8} {p['capacity_devices']:>7} {p['used_devices']:>6.2f} "
                f"{p['free_devices']:>6.2f} {p['leases']:>6} {p['fragmentation']:>5.2f}"
            )
    if status.get("scheduler"):
        print(f"\n{'MODEL':<20} {'QUEUED':>6} {'LEASED':>6}  ROUTES")
        for name, m in status["scheduler"].items():
            routes = ", ".join(f"{k} {v}" for k, v in m["routes"].items() if v) or "-"
            if m.get("engine_cache_blocks"):  # prefix_cache_view: engine
                routes += f"  (engines report {m['engine_cache_blocks']} cached blocks)"
            print(f"{name:<20} {m['queue_depth']:>6} {m['in_flight']:>6}  {routes}")
    print(f"\n{'REPLICA':<32} {'STATE':<9} {'ACCEL':<6} {'RUN':>4} {'WAIT':>4} {'KV%':>5}")
    for r in status["replicas"]:
        print(
            f"{r['replica_id']:<32} {r['state']:<9} {r['accelerator']:<6} {r['running']:>4} "
            f"{r['waiting']:>4} {100 * r['kv_cache_usage']:>5.1f}"
        )


def cmd_chat(args: argparse.Namespace) -> int:
    from airi_ray.app import connect

    client = connect(args.address or "auto", api_key=args.api_key)
    if args.graph:
        return _chat_with_graph(client, args.graph)
    model = args.model or next(
        (m["name"] for m in client.models() if m["task"] == "generate"), None
    )
    if model is None:
        print("no chat model is deployed", file=sys.stderr)
        return 1
    history: list[dict[str, str]] = []
    for line in _lines(f"chatting with {model}; empty line or Ctrl-D to quit"):
        history.append({"role": "user", "content": line})
        print(f"{model}> ", end="", flush=True)
        answer = []
        for piece in client.chat(
            model, history, stream=True, max_tokens=args.max_tokens, temperature=args.temperature
        ):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def _lines(banner: str) -> Iterator[str]:
    """The user's lines from stdin: at a terminal (after ``banner``) until an empty line or
    Ctrl-D; from a pipe, every non-empty line."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(banner)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return
        if line.strip():
            yield line
        elif interactive:
            return


def _chat_with_graph(client: Any, graph: str) -> int:
    """Each line is a turn of one conversation with the graph (``question`` and
    ``conversation_id`` inputs, ``answer`` and, if the graph has them, ``sources``)."""
    import uuid

    conversation = f"cli-{uuid.uuid4().hex[:12]}"
    for line in _lines(
        f"talking to graph {graph} (conversation {conversation}); empty line to quit"
    ):
        run = client.run_graph(graph, {"question": line, "conversation_id": conversation})
        if run["status"] != "finished":
            print(f"run {run['run_id']} {run['status']}: {run['error']}", file=sys.stderr)
            continue
        state = run["state"]
        print(f"{graph}> {str(state.get('answer', '')).strip()}")
        if state.get("sources"):
            print(f"   sources: {', '.join(state['sources'])}   (airi trace {run['run_id']})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from airi_ray.app import connect
    from airi_ray.core.registry import version_key

    client = connect(args.address or "auto", api_key=args.api_key)
    if args.collection not in client.collections():
        made = client.create_collection(args.collection, model=args.model)
        print(
            f"created collection {args.collection!r} ({version_key(made['model'], made['version'])})"
        )
    folder = Path(args.path)
    if folder.is_dir():
        result = client.ingest(args.collection, folder=folder)
    else:
        text = folder.read_text()
        result = client.ingest(args.collection, documents=[{"id": folder.stem, "text": text}])
    print(f"{result['documents']} documents, {result['chunks']} chunks in {args.collection!r}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from airi_ray.app import connect

    client = connect(args.address or "auto", api_key=args.api_key)
    for hit in client.retrieve(args.collection, args.query, k=args.k):
        first_line = hit["text"].strip().splitlines()[0][:80]
        print(f"{hit['score']:.3f}  [{hit['id']}]  {first_line}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from airi_ray.app import connect
    from airi_ray.core.traces import render_tree

    spans = connect(args.address or "auto", api_key=args.api_key).trace(args.id)
    if args.json:
        print(json.dumps(spans, indent=2))
    else:
        print(render_tree(spans, color=sys.stdout.isatty()))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from airi_ray.app import connect
    from airi_ray.core.registry import version_key

    client = connect(args.address or "auto", api_key=args.api_key)
    alerts = client.alerts(args.model, args.severity, args.limit)
    if args.json:
        print(json.dumps(alerts, indent=2))
        return 0
    if not alerts:
        print("no alerts")
    for a in alerts:
        where = version_key(a["model"], a["version"]) + (f" {a['replica']}" if a["replica"] else "")
        print(f"{_when(a['at'])}  {a['severity']:<8} {a['kind']:<22} {where}")
        print(f"    {a['message']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from airi_ray.app import connect

    client = connect(args.address or "auto", api_key=args.api_key)
    path = client.report(args.out, window_s=args.window * 60, png_dir=args.png_dir)
    print(f"wrote {path}")
    return 0


def _connection_args(parser: argparse.ArgumentParser, *, key: bool = True) -> None:
    """The options of every command that talks to a running app: where, and as whom."""
    if key:
        parser.add_argument("--api-key", default=None, help="tenant key (default $AIRI_API_KEY)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: the running cluster)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="airi", description="AI runtime on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start or join a Ray cluster and deploy an app spec")
    up.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"app spec YAML (default {DEFAULT_CONFIG})"
    )
    up.add_argument("--port", type=int, default=None, help="HTTP port (overrides the spec)")
    up.add_argument(
        "--address", default=None, help="Ray cluster address (default: start or join a local one)"
    )
    up.add_argument(
        "--resources", default=None, help="extra Ray resources for a new local head, as JSON"
    )
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local head")
    up.set_defaults(fn=cmd_up)

    down = sub.add_parser("down", help="stop the app and the local Ray cluster")
    _connection_args(down, key=False)
    down.add_argument("--keep-ray", action="store_true", help="leave the Ray cluster running")
    down.set_defaults(fn=cmd_down)

    dep = sub.add_parser("deploy", help="deploy an app spec on the running cluster")
    dep.add_argument("file", help="app spec (YAML)")
    _connection_args(dep, key=False)
    dep.add_argument("--no-wait", action="store_true", help="return before replicas are ready")
    dep.set_defaults(fn=cmd_deploy)

    ro = sub.add_parser("rollout", help="move a model to another version (canary or blue-green)")
    ro.add_argument("model")
    ro.add_argument("--to", required=True, help="the version to move to")
    ro.add_argument("--strategy", choices=["canary", "blue-green"], default=None)
    ro.add_argument("--steps", default=None, help="canary traffic steps, e.g. 10,50,100")
    ro.add_argument(
        "--with",
        dest="with_",
        action="append",
        metavar="MODEL=VERSION",
        help="another model that switches in the same instant (repeatable)",
    )
    ro.add_argument("--wait", action="store_true", help="follow it until it finishes")
    _connection_args(ro, key=False)
    ro.set_defaults(fn=cmd_rollout)

    rb = sub.add_parser("rollback", help="stop a rollout, or go back to the previous version")
    rb.add_argument("model")
    _connection_args(rb, key=False)
    rb.set_defaults(fn=cmd_rollback)

    st = sub.add_parser("status", help="models, replicas and their state")
    _connection_args(st, key=False)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    chat = sub.add_parser("chat", help="chat with a deployed model (stdin lines)")
    chat.add_argument("--model", default=None)
    chat.add_argument(
        "--graph", default=None, help="talk to a graph instead (e.g. support_assistant)"
    )
    _connection_args(chat)
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.set_defaults(fn=cmd_chat)

    ingest = sub.add_parser("ingest", help="chunk, embed and store documents in a collection")
    ingest.add_argument("collection")
    ingest.add_argument("path", help="a folder of .md/.txt files, or one file")
    ingest.add_argument("--model", default="minilm", help="embedding model of a new collection")
    _connection_args(ingest)
    ingest.set_defaults(fn=cmd_ingest)

    retrieve = sub.add_parser("retrieve", help="the chunks of a collection closest to a query")
    retrieve.add_argument("collection")
    retrieve.add_argument("query")
    retrieve.add_argument("-k", type=int, default=5)
    _connection_args(retrieve)
    retrieve.set_defaults(fn=cmd_retrieve)

    tr = sub.add_parser("trace", help="the trace of a graph run or a call, as a tree")
    tr.add_argument("id", help="a run id, a completion id (chatcmpl-...) or a request id")
    tr.add_argument("--json", action="store_true", help="the spans as JSON")
    _connection_args(tr)
    tr.set_defaults(fn=cmd_trace)

    al = sub.add_parser("alerts", help="recent drift and anomaly alerts, newest first")
    al.add_argument("--model", default=None)
    al.add_argument("--severity", choices=["info", "warning", "critical"], default=None)
    al.add_argument("--limit", type=int, default=50)
    al.add_argument("--json", action="store_true")
    _connection_args(al)
    al.set_defaults(fn=cmd_alerts)

    rp = sub.add_parser("report", help="an HTML page with plots of a recent window")
    rp.add_argument("--out", default="airi-report.html", help="where to write the page")
    rp.add_argument("--window", type=float, default=15, help="minutes to cover (at most 60)")
    rp.add_argument("--png-dir", default=None, help="also write each plot as a PNG here")
    _connection_args(rp)
    rp.set_defaults(fn=cmd_report)

    keys = sub.add_parser("keys", help="create, revoke and list API keys (no restart needed)")
    _connection_args(keys, key=False)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="issue a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(fn=cmd_keys)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(fn=cmd_keys)
    listing = keys_sub.add_parser("list", help="key ids, tenants and dates (never secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(fn=cmd_keys)
    return p


def cmd_keys(args: argparse.Namespace) -> int:
    import ray

    from airi_ray.app import init_ray
    from airi_ray.core.errors import AiriError
    from airi_ray.runtime.names import CONTROLLER_NAME, get_actor

    init_ray(args.address or "auto")
    try:
        controller = get_actor(CONTROLLER_NAME)
    except ValueError:
        print("error: no airi app is running; start one with `airi up`", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            made = ray.get(controller.create_key.remote(args.tenant))
            print(made["key"])
            print(
                f"key id {made['key_id']} for tenant {made['tenant']}; it is shown only once",
                file=sys.stderr,
            )
        elif args.keys_command == "revoke":
            info = ray.get(controller.revoke_key.remote(args.key_id))
            print(f"revoked key {info['key_id']} of tenant {info['tenant']}")
        else:
            keys = ray.get(controller.list_keys.remote())
            if args.json:
                print(json.dumps(keys, indent=2))
            else:
                print(f"{'KEY ID':<14} {'TENANT':<20} {'SOURCE':<6} {'CREATED':<20} REVOKED")
                for k in keys:
                    print(
                        f"{k['key_id']:<14} {k['tenant']:<20} {k['source']:<6} "
                        f"{_when(k['created_at']):<20} {_when(k['revoked_at']) or '-'}"
                    )
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, AiriError):
            raise e.cause from None
        raise
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""


def main(argv: list[str] | None = None) -> int:
    from airi_ray.core.errors import AiriError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except AiriError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
