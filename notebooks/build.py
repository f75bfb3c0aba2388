"""Generate the notebooks of this folder, without running them (``run.py`` runs them).

    .venv/bin/python notebooks/build.py

Each notebook is written below as a list of cells: markdown that explains a step to a
newcomer, then a small code cell. Cell ids come from the notebook's name and the cell's
position, so a second run writes the same files byte for byte (outputs are left empty).
Code cells are kept as ``ruff format`` writes them: ``ruff format notebooks`` leaves the
generated files unchanged.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]  # ("markdown" | "code", source)


def md(text: str) -> Cell:
    return ("markdown", text)


def code(text: str) -> Cell:
    return ("code", text)


# Every notebook starts here: the repo root as working directory (where `run.py` starts
# the kernel; opened from notebooks/ in Jupyter, the cell finds it), and on sys.path, so
# spec files and `deployments.*` modules resolve.
SETUP = code(
    r"""
    import os
    import sys
    from pathlib import Path

    ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "deployments").is_dir())
    os.chdir(ROOT)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    print("repo root:", ROOT)
    print("python:   ", sys.executable)
    """
)

# -- quickstart -----------------------------------------------------------------------------

QUICKSTART: list[Cell] = [
    md(
        r"""
        # Quickstart: chat, stream, embed, read the metrics

        This notebook talks to the airi app running on a local Ray cluster, from Python:

        1. deploy `deployments/quickstart.yaml` (a tiny chat model and an embedding model),
        2. connect as a tenant with its API key,
        3. look at what runs, then chat, stream and embed,
        4. read the Prometheus metrics those calls produced.

        **Before you start**, a Ray cluster must be running on this machine: `airi up`
        starts one (see the README), and `make notebooks` starts one, runs the three
        notebooks and stops it again. Paths below are relative to the repo root.
        """
    ),
    SETUP,
    md(
        r"""
        ## 1. Deploy the app

        An **app spec** lists the models to serve and the tenants allowed to call them.
        `deployments/quickstart.yaml` has `tiny-chat` (a small generator trained on a
        shop's support knowledge base, 2 replicas) and `minilm` (a sentence-embedding
        model), and two tenants with their keys.

        `init_ray("auto")` joins the running cluster (and fails if there is none).
        `airi.deploy` then makes the cluster match the spec and waits until every replica
        is ready (quick when the app already runs, as after `airi up`).
        """
    ),
    code(
        r"""
        import airi_ray as airi
        from airi_ray.app import init_ray

        SPEC = "deployments/quickstart.yaml"
        init_ray("auto")
        spec = airi.load_spec(SPEC)
        deployed = airi.deploy(SPEC)
        print("app", repr(deployed["app"]), "serves", ", ".join(m["name"] for m in deployed["models"]))
        """
    ),
    md(
        r"""
        ## 2. Connect as a tenant

        Every call carries an API key; the key decides the **tenant**, whose limits,
        allowed models and fair share of the replicas apply to the call. We take the first
        tenant of the spec.
        """
    ),
    code(
        r"""
        tenant = spec.tenants[0]
        client = airi.connect("auto", api_key=tenant.api_keys[0])
        print("connected as tenant", repr(tenant.name))
        """
    ),
    md(
        r"""
        ## 3. What is running

        `client.status()` describes each model (version, task, ready/wanted replicas,
        context window in tokens) and each replica (its state, the requests it is running
        or holding back, and how full its KV cache is).
        """
    ),
    code(
        r"""
        status = client.status()
        for m in status["models"]:
            name = f"{m['name']}@{m['version']}"
            print(
                f"{name:<14} {m['task']:<9} ready {m['ready_replicas']}/{m['replicas']}  "
                f"context {m['max_model_len'] or '-'}"
            )
        print()
        for r in status["replicas"]:
            print(
                f"{r['replica_id']:<30} {r['state']:<8} running {r['running']}  "
                f"waiting {r['waiting']}  KV cache {100 * r['kv_cache_usage']:.1f}%"
            )
        """
    ),
    md(
        r"""
        ## 4. A chat call

        `client.chat(model, messages)` waits for the whole answer and returns a
        `Completion`: `.text`, and `.usage` with token counts and timings (`ttft_s` is the
        time to the first token). `temperature=0` makes the answer deterministic.
        `tiny-chat` is tiny: expect short, shop-flavoured answers, not a general assistant.
        """
    ),
    code(
        r"""
        r = client.chat("tiny-chat", "How do I return an item?", max_tokens=48, temperature=0)
        print(r.text.strip())
        u = r.usage
        ttft = f"{1000 * u.ttft_s:.0f} ms" if u.ttft_s is not None else "-"
        print(
            f"\n{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens; "
            f"first token after {ttft}, done after {1000 * u.e2e_s:.0f} ms ({u.finish_reason})"
        )
        """
    ),
    md(
        r"""
        ## 5. Streaming

        With `stream=True`, `chat` returns an iterator of text pieces as the replica
        generates them. Messages can also be a list in the OpenAI format. Leaving the loop
        early (`break`) aborts the request on the replica.
        """
    ),
    code(
        r"""
        import time

        messages = [{"role": "user", "content": "Do you ship to Canada?"}]
        start, first, pieces = time.perf_counter(), None, []
        for piece in client.chat("tiny-chat", messages, stream=True, max_tokens=48, temperature=0):
            first = first if first is not None else time.perf_counter() - start
            pieces.append(piece)
            print(piece, end="", flush=True)
        if first is not None:
            print(f"\n\n{len(pieces)} pieces, the first after {1000 * first:.0f} ms")
        """
    ),
    md(
        r"""
        ## 6. Embeddings

        `client.embed(model, texts)` returns one vector per text. Texts with similar
        meaning get vectors pointing in similar directions, so the **cosine similarity**
        (the dot product of the normalised vectors, 1 = same direction) ranks sentences by
        how close they are to a question. This is how retrieval finds relevant documents.
        """
    ),
    code(
        r"""
        import numpy as np

        question = "Can I send back boots that do not fit?"
        sentences = [
            "Returns are free within 60 days for unused items.",
            "Tents must be completely dry before you store them.",
            "Nimbus Plus members get free express shipping.",
        ]
        vectors = np.asarray(client.embed("minilm", [question, *sentences]))
        print(f"{len(vectors)} vectors of {vectors.shape[1]} numbers")
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        similarity = unit[1:] @ unit[0]
        print(f"\ncosine similarity to {question!r}:")
        for score, sentence in sorted(zip(similarity, sentences, strict=True), reverse=True):
            print(f"  {score:.3f}  {sentence}")
        """
    ),
    md(
        r"""
        ## 7. Metrics

        The app's HTTP server (port 8000 in the spec) exports **Prometheus metrics** at
        `/metrics`, labelled by model and tenant. Calls from Python take the same path as
        HTTP calls, so the calls above are counted. We parse the text with
        `prometheus_client` and keep four series: finished requests (by outcome), how many
        times-to-first-token were observed (the histogram's `_count`), and prompt and
        generated tokens.
        """
    ),
    code(
        r"""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{spec.ingress.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()

        WANTED = (
            "airi_requests_total",
            "airi_ttft_seconds_count",
            "airi_input_tokens_total",
            "airi_output_tokens_total",
        )
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in WANTED:
                    labels = " ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    print(f"{sample.name:<25} {labels:<42} {sample.value:g}")
        """
    ),
    md(
        r"""
        ## 8. Close

        `close()` ends this client's streams to the scheduler and the replicas. The app
        keeps running for other clients (`airi down` stops it and the cluster).
        """
    ),
    code(
        r"""
        client.close()
        """
    ),
]

# -- support assistant --------------------------------------------------------------------

SUPPORT_ASSISTANT: list[Cell] = [
    md(
        r"""
        # Support assistant: a graph of model calls, traced

        The Nimbus Gear support assistant (`deployments/support_assistant.py`) turns one
        customer question into a **graph** of steps (nodes), each a model call or plain
        Python:

        `memory` (earlier turns of the conversation) → `intent` (embed the question,
        classify it) → `retrieve` (knowledge-base passages) → `answer` (the model for that
        intent) → `check` (are the passages relevant, is the answer grounded in them?) →
        either `rewrite` the query and retrieve again, or `finish` (citations, and the turn
        stored in the conversation).

        We hold a three-turn conversation, look at the path each run took and its
        **trace** (a timed tree of every node and model call), and draw a timeline.
        Needs a running cluster, like the quickstart.
        """
    ),
    SETUP,
    md(
        r"""
        ## 1. Deploy the assistant

        `deployments/support_assistant.yaml` replaces the quickstart app: `minilm` for
        embeddings, and `orders-assistant` and `care-assistant` as answer models (both
        serve the tiny demo model here, as separate entries so each can be scaled and
        rolled out on its own). Its tenants redact card numbers, e-mails and phone numbers.

        The spec's graph has a **builder** that runs here, in this kernel, once the models
        are ready: it ingests the knowledge base into the `nimbus-kb` collection (every
        chunk embedded by `minilm`) and trains the intent classifier on embeddings of
        labelled example questions. Expect a minute or two on a small machine.
        """
    ),
    code(
        r"""
        import time

        import airi_ray as airi
        from airi_ray.app import init_ray

        SPEC = "deployments/support_assistant.yaml"
        init_ray("auto")
        spec = airi.load_spec(SPEC)
        started = time.perf_counter()
        deployed = airi.deploy(SPEC)
        print(f"deployed {deployed['app']!r} in {time.perf_counter() - started:.0f} s")
        for m in deployed["models"]:
            print(f"  {m['name']:<17} {m['task']:<9} ready {m['ready_replicas']}/{m['replicas']}")
        """
    ),
    md(
        r"""
        ## 2. Connect, and look at the graph

        We connect with the first tenant's key (`web`, the shop's chat widget). The graph's
        description lists its nodes, its plain edges, and its one **branch**: after `check`,
        a router picks `again` (rewrite the query and retrieve once more) or `done`, with a
        bound on how many times the loop may run.
        """
    ),
    code(
        r"""
        GRAPH = "support_assistant"
        tenant = spec.tenants[0]
        client = airi.connect("auto", api_key=tenant.api_keys[0])
        print("connected as tenant", repr(tenant.name))

        graph = next(g for g in client.graphs() if g["name"] == GRAPH)
        print("\nnodes:", ", ".join(n["name"] for n in graph["nodes"]))
        for e in graph["edges"]:
            print(f"  {' + '.join(e['sources'])} -> {e['target']}")
        for b in graph["branches"]:
            paths = ", ".join(f"{key} -> {target}" for key, target in b["paths"].items())
            print(f"  {b['source']} -> ({paths}); at most {b['max_iterations']} loops")
        """
    ),
    md(
        r"""
        ## 3. Helpers

        - `ask(question)` runs the graph with `client.run_graph` and prints what it found.
          A run returns `run_id`, `status`, the final `state` (intent, confidence, model,
          query, hits, answer, relevance, grounding, retrievals, citations, sources,
          history), `usage` and `trail`. All turns share one `conversation_id`.
        - `path(run)` reads the `trail`: one `[step, node, taken]` entry per node that
          finished, where `taken` is `->` for a plain edge or the key the branch chose
          (`again`, `done`, or `exit:done` when the loop bound forced the exit).
        - `show_trace(run)` fetches the run's spans with `client.trace(run_id)`, prints them
          as a tree (`render_tree`) and their totals (`summarize`). Traces are stored in the
          background after the run answers, so it retries for up to 10 s.
        """
    ),
    code(
        r"""
        import uuid

        conversation = f"nb-{uuid.uuid4().hex[:8]}"


        def ask(question):
            run = client.run_graph(GRAPH, {"question": question, "conversation_id": conversation})
            if run["status"] != "finished":
                raise RuntimeError(f"run {run['run_id']} {run['status']}: {run['error']}")
            s = run["state"]
            print(f"Q: {question}")
            print(f"   intent {s['intent']} (confidence {s['confidence']:.2f}) -> {s['model']}")
            print(
                f"   {s['retrievals']} retrieval(s), relevance {s['relevance']:.2f}, "
                f"grounding {s['grounding']:.2f}; sources: {', '.join(s['sources'])}"
            )
            print(f"A: {s['answer'].strip()}")
            usage = run["usage"]
            print(f"   {usage['tokens']} tokens in {usage['calls']} model calls; {run['run_id']}")
            return run


        def path(run):
            steps = [node if taken == "->" else f"{node} [{taken}]" for _, node, taken in run["trail"]]
            return " -> ".join([*steps, "END"])
        """
    ),
    code(
        r"""
        from airi_ray.core.errors import NotFound
        from airi_ray.core.traces import render_tree, summarize


        def trace_of(run_id, timeout_s=10.0):
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    spans = client.trace(run_id)
                except NotFound:
                    spans = []
                if any(s["name"].startswith("run ") for s in spans) or time.monotonic() > deadline:
                    return spans
                time.sleep(0.5)


        def show_trace(run):
            spans = trace_of(run["run_id"])
            if not spans:
                print("no trace stored yet: try show_trace(run) again in a moment")
                return spans
            print(render_tree(spans))
            s = summarize(spans)
            print(
                f"\n{s['spans']} spans over {s['duration_ms']:.0f} ms, tokens {s['tokens']}, "
                f"models {', '.join(s['models'])}, errors {s['errors']}"
            )
            for kind, k in s["by_kind"].items():
                print(f"  {kind:<11} {k['count']:>3} spans {k['total_ms']:>9.1f} ms")
            return spans
        """
    ),
    md(
        r"""
        ## 4. First question: returns

        The classifier should call this a `returns` question, which routes the answer to
        `orders-assistant`. The sources are the knowledge-base documents of the retrieved
        passages.
        """
    ),
    code(
        r"""
        run1 = ask("How long do I have to return a pair of boots?")
        print("\npath:", path(run1))
        """
    ),
    md(
        r"""
        The trace: the `run` span at the top, a span per node below it (offsets from the
        start of the run in brackets), and inside the nodes the model calls (model@version,
        time queued, time to first token, tokens in and out, replica), retrievals and
        policy checks (the tenant's filters, applied before each model call).
        """
    ),
    code(
        r"""
        spans1 = show_trace(run1)
        """
    ),
    md(
        r"""
        ## 5. A follow-up that needs memory

        "And for Nimbus Plus members?" says nothing about returns on its own. The `memory`
        node loads the conversation's last turns. For a short follow-up, `intent` classifies
        and `retrieve` searches the question with the previous one prepended (`query`
        below), and the answer model gets the earlier turns with its prompt.
        """
    ),
    code(
        r"""
        run2 = ask("And for Nimbus Plus members?")
        print("\nquery used for retrieval:", run2["state"]["query"])
        print("earlier turns the model saw:", len(run2["state"]["history"]))
        print("path:", path(run2))
        """
    ),
    code(
        r"""
        spans2 = show_trace(run2)
        """
    ),
    md(
        r"""
        ## 6. A card number is redacted

        The tenant's policy (`filters: {card: redact}`) runs on every model call of the
        run: a card number (checked with the Luhn checksum) is replaced by `[CARD]` before
        the prompt reaches a model, and the `finish` node stores the question as the
        filters redact it.
        """
    ),
    code(
        r"""
        CARD = "4111 1111 1111 1111"
        run3 = ask(f"My card {CARD} was charged twice for order NG10935521, can you help?")
        print("\npath:", path(run3))
        """
    ),
    code(
        r"""
        spans3 = show_trace(run3)
        """
    ),
    md(
        r"""
        ## 7. Timeline of the last run

        The same spans as a picture: one wide bar per node, from its start to its end
        (time since the run started), and the model calls made inside it as thin bars on
        its row, coloured by model. Nodes of the same step would run side by side; here
        each step has one node, so the bars form a staircase. A rewrite adds `rewrite`,
        then a second `retrieve`, `answer` and `check`.
        """
    ),
    code(
        r"""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch


        def attrs(span):
            return span.get("attributes") or {}


        def timeline(spans):
            by_id = {s["span_id"]: s for s in spans}
            nodes = sorted(
                (s for s in spans if attrs(s).get("airi.kind") == "node"), key=lambda s: s["start_ns"]
            )
            if not nodes:
                print("no node spans in this trace")
                return
            row = {s["span_id"]: i for i, s in enumerate(nodes)}
            runs = [s for s in spans if attrs(s).get("airi.kind") == "run"]
            t0 = runs[0]["start_ns"] if runs else nodes[0]["start_ns"]

            def ms(ns):
                return (ns - t0) / 1e6

            def node_row(span):  # the row of the node the span ran in
                parent = span.get("parent_id")
                while parent is not None and parent not in row:
                    parent = by_id.get(parent, {}).get("parent_id")
                return row.get(parent)

            calls = [
                s for s in spans if attrs(s).get("airi.kind") == "model_call" and node_row(s) is not None
            ]
            models = sorted({str(attrs(s).get("airi.model")) for s in calls})
            colors = dict(zip(models, plt.get_cmap("tab10").colors, strict=False))

            fig, ax = plt.subplots(figsize=(9, 0.45 * len(nodes) + 1.5))
            for i, s in enumerate(nodes):
                start, width = ms(s["start_ns"]), (s["end_ns"] - s["start_ns"]) / 1e6
                ax.barh(i, width, left=start, height=0.6, color="lightsteelblue", edgecolor="steelblue")
            for s in calls:
                start, width = ms(s["start_ns"]), (s["end_ns"] - s["start_ns"]) / 1e6
                color = colors[str(attrs(s).get("airi.model"))]
                ax.barh(node_row(s), width, left=start, height=0.2, color=color)
            labels = [f"{s['name'].removeprefix('node ')} (step {attrs(s)['airi.step']})" for s in nodes]
            ax.set_yticks(range(len(nodes)), labels)
            ax.invert_yaxis()
            ax.set_xlabel("ms since the run started")
            ax.set_title(runs[0]["name"] if runs else "graph run")
            handles = [Patch(color="lightsteelblue", label="node")]
            handles += [Patch(color=c, label=f"model call: {m}") for m, c in colors.items()]
            ax.legend(handles=handles, loc="lower right", fontsize=8)
            fig.tight_layout()
            plt.show()


        timeline(spans3)
        """
    ),
    md(
        r"""
        ## 8. The stored conversation

        `client.conversation(id)` reads the conversation back from the durable context
        store: the question and answer of each turn, in order, as the `finish` node stored
        them. The card number is stored redacted. The run's own input (in the result of
        `run_graph`) is the question as it was sent.
        """
    ),
    code(
        r"""
        turns = client.conversation(conversation)
        for t in turns:
            print(f"{t['seq']:>2} {t['role']:<9} {t['content'].strip()}")
        print("\ncard number in the stored conversation:", any(CARD in t["content"] for t in turns))
        print("card number in the run's input:         ", CARD in run3["state"]["question"])
        """
    ),
    code(
        r"""
        client.close()
        """
    ),
]

# -- scheduling -----------------------------------------------------------------------------

SCHEDULING: list[Cell] = [
    md(
        r"""
        # Scheduling: fair shares and prefix routing, from the benchmark results

        No cluster needed: this notebook reads what two benchmarks wrote
        (`make bench`, or `python benchmarks/fairness.py` and
        `python benchmarks/prefix_routing.py`) in `benchmarks/results/`, and plots it.
        Each file holds one run (the committed ones: a 2-core machine, CPU vLLM, the tiny
        demo model), and runs vary a lot: compare the two ways within a file, not numbers
        across runs.
        """
    ),
    SETUP,
    md(
        r"""
        ## The files

        Both are nested JSON: the workload, one entry per way of scheduling, and the
        benchmark's targets. `leaves` flattens them into dotted keys.
        """
    ),
    code(
        r"""
        import json

        RESULTS = Path("benchmarks/results")
        fairness = json.loads((RESULTS / "fairness.json").read_text())
        routing = json.loads((RESULTS / "prefix_routing.json").read_text())


        def leaves(d, path=""):
            for key, value in d.items():
                if isinstance(value, dict):
                    yield from leaves(value, f"{path}{key}.")
                else:
                    yield f"{path}{key}", value


        for name, data in (("fairness.json", fairness), ("prefix_routing.json", routing)):
            print(f"{name}: {', '.join(data)}")
            for key, value in leaves(data):
                print(f"  {key} = {value}")
        """
    ),
    md(
        r"""
        ## Fairness: virtual token counters

        When several tenants want the same replicas, the scheduler picks whose request
        goes next. Under **VTC** (virtual token counters, Sheng et al., OSDI '24) every
        tenant has a counter of the service it received, in weighted tokens: 1 per prompt
        token, `output_weight` per generated token, divided by the tenant's weight. The next
        request comes from the waiting tenant with the **smallest counter**. A tenant that
        comes back from idle is lifted to the smallest counter of the waiting tenants, so
        it cannot save up credit. Under **FCFS** (first come, first served) requests go in
        arrival order, so a tenant that sends more requests gets more service.

        The benchmark: tenants A and B with equal weights share one replica; A sends 8 times
        B's request rate, and B alone already asks for more than half of what the replica
        can serve, so both always have requests waiting. The same workload runs under both
        policies.
        """
    ),
    code(
        r"""
        w = fairness["workload"]
        TENANTS = sorted(w["tenants"])
        POLICIES = [p for p in ("vtc", "fcfs") if p in fairness]
        sent_b = w["rate_b_rps"] / (w["rate_a_rps"] + w["rate_b_rps"])
        print(
            f"{w['seconds']:.0f} s on one replica with {w['replica_slots']} slots "
            f"(about {w['capacity_rps']} requests/s)"
        )
        print(f"A sends {w['rate_a_rps']} requests/s, B {w['rate_b_rps']}: B sends {sent_b:.1%} of them")
        print(f"{w['output_tokens']} generated tokens per request, each weighted {w['output_weight']}")
        """
    ),
    md(
        r"""
        **Share of the service** each tenant received (weighted tokens), per policy. Equal
        weights mean a fair split is half each; the shaded band is the benchmark's target
        for B under VTC, and the dotted line B's share of the requests sent.
        """
    ),
    code(
        r"""
        import matplotlib.pyplot as plt
        import numpy as np

        low, high = fairness["targets"]["vtc.share_b"]
        x = np.arange(len(POLICIES))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, tenant in enumerate(TENANTS):
            shares = [fairness[p][f"share_{tenant.lower()}"] for p in POLICIES]
            bars = ax.bar(x + (i - 0.5) * 0.38, shares, width=0.38, label=f"tenant {tenant}")
            ax.bar_label(bars, fmt="%.3f")
        ax.axhspan(low, high, color="green", alpha=0.12, label="target for B (VTC)")
        ax.axhline(sent_b, color="grey", linestyle=":", label="B's share of requests sent")
        ax.set_xticks(x, [p.upper() for p in POLICIES])
        ax.set_ylabel("share of weighted tokens served")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        plt.show()
        """
    ),
    md(
        r"""
        **The rest of the file**: tokens served per tenant; the largest gap between the two
        tenants' service at any moment of the window, against the paper's bound for VTC
        (log scale); B's time to first token; and the median number of requests waiting.
        Both tenants are overloaded on purpose, so waits are long under either policy:
        fairness is about how the service is split, not about latency under overload.
        """
    ),
    code(
        r"""
        def grouped(ax, values, title, ylabel):  # values: {series: [one per policy]}
            width = 0.8 / len(values)
            for i, (label, ys) in enumerate(values.items()):
                ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width=width, label=label)
            ax.set_xticks(x, [p.upper() for p in POLICIES])
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)


        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        served = {t: [fairness[p]["served_weighted_tokens"][t] for p in POLICIES] for t in TENANTS}
        grouped(axes[0, 0], served, "service received", "weighted tokens")
        gap = {"largest gap": [fairness[p]["max_service_gap_tokens"] for p in POLICIES]}
        grouped(axes[0, 1], gap, "largest service gap between A and B", "weighted tokens")
        axes[0, 1].axhline(fairness["vtc_bound_tokens"], color="red", linestyle="--", label="VTC bound")
        axes[0, 1].set_yscale("log")
        axes[0, 1].legend(fontsize=8)
        ttft = {q: [fairness[p][f"b_ttft_{q}_ms"] / 1000 for p in POLICIES] for q in ("p50", "p99")}
        grouped(axes[1, 0], ttft, "B's time to first token", "seconds")
        depth = {t: [fairness[p]["median_queue_depth"][t] for p in POLICIES] for t in TENANTS}
        grouped(axes[1, 1], depth, "median requests waiting", "requests")
        fig.tight_layout()
        plt.show()
        """
    ),
    md(
        r"""
        **Time series.** The benchmark keeps totals per policy (and the largest gap over the
        window), not samples over time. The cell below plots any list of numbers the file
        holds, so a later version of the benchmark that records series shows up here.
        """
    ),
    code(
        r"""
        series = {
            k: v
            for k, v in leaves(fairness)
            if isinstance(v, list) and len(v) > 2 and all(isinstance(n, int | float) for n in v)
        }
        if not series:
            print("fairness.json holds no time series (only totals per policy)")
        for key, values in series.items():
            fig, ax = plt.subplots(figsize=(8, 2.5))
            ax.plot(values)
            ax.set_title(key, fontsize=10)
            plt.show()
        """
    ),
    md(
        r"""
        The verdict, computed from the file: B's share under each policy against the
        target, and the largest gap against the bound.
        """
    ),
    code(
        r"""
        bound = fairness["vtc_bound_tokens"]
        for p in POLICIES:
            r = fairness[p]
            print(
                f"{p.upper():>4}: B served {r['share_b']:.1%} of the service (sent {sent_b:.1%} of "
                f"the requests); largest gap {r['max_service_gap_tokens']:,} tokens"
            )
        share_ok = low <= fairness["vtc"]["share_b"] <= high
        gap_ok = fairness["vtc"]["max_service_gap_tokens"] < bound
        print(f"\nVTC target, B's share in [{low}, {high}]: {'met' if share_ok else 'missed'}")
        print(f"VTC largest gap below the bound ({bound:,.0f} tokens): {'yes' if gap_ok else 'no'}")
        print(f"bound: {fairness['vtc_bound_formula']}")
        """
    ),
    md(
        r"""
        ## Prefix-affinity routing

        vLLM keeps the attention state (KV cache) of recent prompts in blocks and reuses
        it when a new prompt starts with the same tokens: a **prefix-cache hit** skips that
        part of the prompt's computation. The cache lives on one replica, so only a request
        sent to the replica that computed the prefix can hit. **Affinity routing** hashes a
        prompt's 16-token blocks in a chain (each hash covers all blocks before it) and
        sends the request to the replica holding the longest matching prefix, unless that
        replica is busier than the least-loaded one by more than a margin. What a replica
        holds is the router's own estimate (`affinity`), or what the engines' KV cache
        events report (`oracle`, `prefix_cache_view: engine`). **Round robin** takes turns
        and ignores the content.

        The benchmark: 16 agents, each with its own ~600-token system prompt, on fleets
        whose caches together hold 1.2x the prompts (larger than one replica's cache,
        smaller than all of them): 2 replicas (`prefix_routing.json`) and 4
        (`prefix_routing_r4.json`, if present). Two shapes: conversations of 3 turns, each
        turn resending the whole history, and one-turn agent calls (`agent_calls`).
        """
    ),
    code(
        r"""
        runs = [("2 replicas", routing)]
        if (RESULTS / "prefix_routing_r4.json").exists():
            runs.append(("4 replicas", json.loads((RESULTS / "prefix_routing_r4.json").read_text())))
        WAYS = ("affinity", "round_robin", "oracle")
        scenarios = []  # (label, one shape's results)
        for fleet, r in runs:
            scenarios.append((f"{fleet}, conversations", r))
            if r.get("agent_calls"):
                scenarios.append((f"{fleet}, agent calls", r["agent_calls"]))
        for label, s in scenarios:
            line = ", ".join(f"{way} {s[way]['hit_rate']:.3f}" for way in WAYS)
            print(f"{label}: hit rate {line}; ratio {s['hit_rate_ratio']}")
        """
    ),
    code(
        r"""
        x = np.arange(len(scenarios))
        width = 0.27
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
        for i, way in enumerate(WAYS):
            offset = (i - 1) * width
            hits = [s[way]["hit_rate"] for _, s in scenarios]
            bars = left.bar(x + offset, hits, width=width, label=way)
            left.bar_label(bars, fmt="%.2f", fontsize=7)
            p50 = [s[way]["ttft_p50_ms"] for _, s in scenarios]
            p99 = [s[way]["ttft_p99_ms"] for _, s in scenarios]
            right.bar(x + offset, p50, width=width, label=f"{way} p50")
            right.scatter(x + offset, p99, marker="_", s=200, color="black")
        labels = [label.replace(", ", "\n") for label, _ in scenarios]
        left.set_xticks(x, labels, fontsize=8)
        left.set_ylim(0, 1.05)
        left.set_ylabel("vLLM prefix-cache hit rate")
        left.legend(fontsize=8, loc="lower right")
        right.set_xticks(x, labels, fontsize=8)
        right.set_ylabel("time to first token, ms (bar p50, dash p99)")
        right.legend(fontsize=8)
        fig.tight_layout()
        plt.show()
        """
    ),
    md(
        r"""
        ## The honest result

        The targets: affinity at least twice round robin's hit rate, at least 0.9 of the
        oracle's, and lower TTFT p50 and p99 than round robin. The oracle does no better
        than affinity, so affinity's estimate does not drift on this workload. Round robin
        still reuses within a conversation (its next turn lands on the same replica 1 time
        in N), which on 2 replicas keeps its hit rate too high for 2x to be reachable by
        any router; on 4 it is. The cell checks each target from the files.
        """
    ),
    code(
        r"""
        for label, s in scenarios:
            met = ", ".join(f"{k} {'met' if v else 'missed'}" for k, v in s["met"].items())
            print(f"{label}: ratio {s['hit_rate_ratio']}, affinity/oracle {s['affinity_vs_oracle']}; {met}")
        print("targets:", routing["targets"])
        """
    ),
]

NOTEBOOKS: dict[str, list[Cell]] = {
    "quickstart": QUICKSTART,
    "support_assistant": SUPPORT_ASSISTANT,
    "scheduling": SCHEDULING,
}


def notebook(name: str, cells: list[Cell]) -> nbformat.NotebookNode:
    nb = new_notebook(
        metadata={
            "kernelspec": {
                "name": "python3",
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
            },
            "language_info": {"name": "python"},
        }
    )
    for i, (kind, source) in enumerate(cells):
        text = textwrap.dedent(source).strip("\n")
        cell = new_markdown_cell(text) if kind == "markdown" else new_code_cell(text)
        cell["id"] = f"{name}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def build(names: list[str] | None = None) -> list[Path]:
    """Write the named notebooks (all by default); returns their paths."""
    paths = []
    for name in names or list(NOTEBOOKS):
        path = HERE / f"{name}.ipynb"
        nbformat.write(notebook(name, NOTEBOOKS[name]), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(f"wrote {p}")
