"""The health probe: a real generation bounded by a timeout (an engine can hang looking alive)."""

from __future__ import annotations

import asyncio

import pytest

from airi_ray.config import ModelSpec
from airi_ray.engines.vllm_engine import Engine


class _HangingLLM:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def generate(self, prompt, sampling, request_id):  # noqa: ANN001
        await asyncio.Event().wait()  # never produces a token
        yield None

    async def abort(self, request_ids):  # noqa: ANN001
        self.aborted.extend(request_ids)


def _engine(llm) -> Engine:  # noqa: ANN001
    e = Engine.__new__(Engine)  # skip loading vLLM: only the probe logic is under test
    e.spec = ModelSpec(name="m", model="x")
    e._llm = llm
    return e


def test_probe_times_out_and_aborts_a_hung_engine() -> None:
    llm = _HangingLLM()
    with pytest.raises(TimeoutError):
        asyncio.run(_engine(llm).probe(0.05))
    assert len(llm.aborted) == 1 and llm.aborted[0].startswith("probe-")
