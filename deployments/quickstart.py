"""Deploy the quickstart app from a Ray job: ``ray job submit --working-dir . -- python -m deployments.quickstart``.

Builds the demo model on the node if needed, deploys ``deployments/quickstart.yaml`` on the
cluster the job runs in, and checks it answers one chat and one embedding.
"""

from __future__ import annotations

from pathlib import Path

import airi_ray as airi
from airi_ray.models.tiny import ensure_tiny_model

SPEC = Path(__file__).with_name("quickstart.yaml")


def main() -> None:
    ensure_tiny_model()
    spec = airi.load_spec(SPEC)
    airi.deploy(spec)
    client = airi.connect("auto", api_key=spec.tenants[0].api_keys[0])
    print(client.chat("tiny-chat", "How do I return an item?", max_tokens=32).text)
    print(len(client.embed("minilm", "free returns")[0]), "dimensions")
    print(f"airi app {spec.name!r} is up; HTTP on port {spec.ingress.port}")


if __name__ == "__main__":
    main()
