"""The baseline a user would write by hand: one Ray Serve deployment wrapping vLLM's AsyncLLM.

It streams OpenAI-style SSE for ``/v1/completions`` straight from the engine in the replica.
Used by ``overhead.py`` as way (d); not part of airi.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

app = FastAPI()


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class PlainVLLM:
    def __init__(self, engine_kwargs: dict) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> StreamingResponse:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        body = await request.json()
        params = SamplingParams(
            max_tokens=body["max_tokens"],
            temperature=body.get("temperature", 1.0),
            ignore_eos=body.get("ignore_eos", False),
            output_kind=RequestOutputKind.DELTA,
        )
        rid = f"cmpl-{uuid.uuid4().hex}"

        async def events():
            async for out in self.engine.generate(body["prompt"], params, rid):
                chunk = {
                    "id": rid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "text": out.outputs[0].text,
                            "finish_reason": out.outputs[0].finish_reason,
                        }
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
