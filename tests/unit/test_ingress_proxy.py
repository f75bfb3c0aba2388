"""Which proxy fronts the ingress: HAProxy where its binary exists, a clear error where asked
for and missing, Serve's own proxy when asked for."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airi_ray.config import IngressSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.serve import proxy


def test_haproxy_is_the_default_where_the_binary_exists(monkeypatch) -> None:
    monkeypatch.setattr(proxy, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    assert proxy.resolve(None) == "haproxy"
    assert proxy.controller_env("haproxy")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert proxy.controller_env("haproxy")["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_without_the_binary_the_default_falls_back_and_asking_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(proxy, "haproxy_binary", lambda: None)
    assert proxy.resolve(None) == "serve"
    with pytest.raises(InvalidRequest, match="ingress.proxy is haproxy but no HAProxy binary"):
        proxy.resolve("haproxy")


def test_serve_is_kept_when_asked_for(monkeypatch) -> None:
    monkeypatch.setattr(proxy, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    assert proxy.resolve("serve") == "serve"
    assert proxy.controller_env("serve").get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "0"


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("proxy", "nginx", "haproxy"), ("replicas", 0, "greater than or equal to 1")],
)
def test_the_spec_refuses_an_unknown_proxy_or_no_replicas(field, value, says) -> None:
    with pytest.raises(ValidationError, match=says):
        IngressSpec(**{field: value})
