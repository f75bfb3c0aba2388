"""The vLLM engine arguments airi builds from a model spec (no engine is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from airi_ray.config import ModelSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.engines.vllm_engine import engine_args


def spec(tmp_path: Path, **engine: object) -> ModelSpec:
    return ModelSpec(name="m", model=str(tmp_path), engine={"max_model_len": 1024, **engine})


def test_a_long_prompt_is_prefilled_an_eighth_of_the_window_a_step(tmp_path: Path) -> None:
    assert engine_args(spec(tmp_path)).long_prefill_token_threshold == 128


def test_the_spec_sets_the_long_prefill_chunk_itself(tmp_path: Path) -> None:
    assert (
        engine_args(spec(tmp_path, long_prefill_token_threshold=0)).long_prefill_token_threshold
        == 0
    )
    assert (
        engine_args(spec(tmp_path, long_prefill_token_threshold=64)).long_prefill_token_threshold
        == 64
    )


def test_embedding_engines_keep_whole_prefills(tmp_path: Path) -> None:
    s = ModelSpec(name="e", model=str(tmp_path), task="embed", engine={"max_model_len": 512})
    assert engine_args(s).long_prefill_token_threshold == 0


def test_an_unknown_engine_argument_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="unknown vLLM engine arguments max_num_seqz"):
        engine_args(spec(tmp_path, max_num_seqz=3))
