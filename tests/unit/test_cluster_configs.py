"""The Ray cluster launcher configs in cluster_configs/: valid for the installed Ray, and locked down.

Each YAML is validated against the schema that ships inside the ray package, then prepared the way
`ray up` prepares it before it calls a cloud (Ray's defaults merged in, the common setup commands
merged into the head's and the workers'). The airi checks run on that prepared config, so a field
left to Ray's defaults (whose head starts the dashboard on 0.0.0.0) is caught as well. Each check
returns the problems it found, and each is shown a broken config too, so none passes vacuously.
Needs neither network nor a running Ray.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "cluster_configs"
# Config file -> the object-storage scheme its durable state must use.
STORAGE_SCHEME = {
    "aws-heterogeneous.yaml": "s3://",
    "gcp-heterogeneous.yaml": "gs://",
    "local.yaml": "s3://",
}
CLOUD_CONFIGS = ["aws-heterogeneous.yaml", "gcp-heterogeneous.yaml"]
# Machine families each GPU type must run on: provider -> (node_config field, type -> prefix).
GPU_MACHINES = {
    "aws": ("InstanceType", {"H100": "p5.", "L4": "g6."}),
    "gcp": ("machineType", {"H100": "a3-highgpu-", "L4": "g2-standard-"}),
}
PRIVATE_PORTS = (6379, 8265, 8000)  # Ray GCS, dashboard and job API, airi's HTTP API
WORLD = ("0.0.0.0/0", "::/0")
AIRI_INSTALL = re.compile(r"pip install .*[\"']airi-ray\[gpu\]==(\d+\.\d+\.\d+)[\"']")

Config = dict[str, Any]


def schema_path() -> Path:
    return Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load(name: str) -> Config:
    with open(CONFIG_DIR / name) as f:
        cfg: Config = yaml.safe_load(f)
    return cfg


def prepare(cfg: Config) -> Config:
    """What `ray up` runs with: defaults filled in, then Ray's own checks."""
    prepared: Config = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def ray_start(commands: list[str]) -> str:
    [cmd] = [c for c in commands if "ray start" in c]
    return cmd


# --- checks: each returns what is wrong, empty when all is well --------------------------------


def node_type_problems(cfg: Config) -> list[str]:
    """A CPU head, H100 and L4 worker types on the right machines, a CPU worker type."""
    problems = []
    types: dict[str, Config] = cfg["available_node_types"]
    field, machine_prefix = GPU_MACHINES[cfg["provider"]["type"]]
    head = cfg["head_node_type"]
    if types[head]["resources"].get("GPU", 0):
        problems.append(f"head type {head} declares GPUs; the head is a CPU node")
    accelerators: set[str] = set()
    cpu_workers = []
    for name, t in types.items():
        if t.get("min_workers", 0) > t.get("max_workers", 0):
            problems.append(f"{name}: min_workers {t.get('min_workers')} > max_workers")
        gpus = t["resources"].get("GPU", 0)
        kinds = {
            k.split(":", 1)[1]: v
            for k, v in t["resources"].items()
            if k.startswith("accelerator_type:")
        }
        if gpus and not any(kinds.values()):
            problems.append(f"{name}: declares GPU but no accelerator_type:<TYPE> resource")
        if kinds and not gpus:
            problems.append(f"{name}: declares an accelerator_type but no GPU")
        for kind in kinds:
            machine = t["node_config"][field]
            if not machine.startswith(machine_prefix.get(kind, "?")):
                problems.append(
                    f"{name}: {kind} on {machine}, expected {machine_prefix.get(kind)}*"
                )
        if name != head:
            accelerators |= set(kinds)
            if not gpus and t.get("max_workers", 0) > 0:
                cpu_workers.append(name)
    for kind in ("H100", "L4"):
        if kind not in accelerators:
            problems.append(f"no worker type with accelerator_type:{kind}")
    if not cpu_workers:
        problems.append("no CPU worker type")
    return problems


def setup_problems(cfg: Config) -> list[str]:
    """Head and workers both install a pinned airi-ray[gpu]."""
    return [
        f"{key} do not install a pinned airi-ray[gpu]"
        for key in ("head_setup_commands", "worker_setup_commands")
        if not any(AIRI_INSTALL.search(c) for c in cfg[key])
    ]


def auth_problems(cfg: Config) -> list[str]:
    """Token auth on every node, the token made privately on the head, the dashboard on loopback."""
    problems = []
    head_start = ray_start(cfg["head_start_ray_commands"])
    if "RAY_AUTH_MODE=token" not in head_start:
        problems.append("the head's `ray start` runs without RAY_AUTH_MODE=token")
    if not re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head_start):
        problems.append("the head's `ray start` does not bind the dashboard to 127.0.0.1")
    if any("0.0.0.0" in c for c in cfg["head_start_ray_commands"]):
        problems.append("a head start command binds to 0.0.0.0")
    if "RAY_AUTH_MODE=token" not in ray_start(cfg["worker_start_ray_commands"]):
        problems.append("the workers' `ray start` runs without RAY_AUTH_MODE=token")
    if not any(
        "umask 077" in c and "ray get-auth-token --generate > /dev/null" in c
        for c in cfg["head_setup_commands"]
    ):
        problems.append("the head does not generate the token under umask 077, output dropped")
    if "~/.ray/auth_token" not in cfg.get("cluster_synced_files", []):
        problems.append("the token is not synced from the head to the workers")
    if "RAY_AUTH_TOKEN=" in json.dumps(cfg):
        problems.append("a token value is written into the config")
    return problems


def storage_problems(cfg: Config, scheme: str) -> list[str]:
    """Every node's environment points durable state at object storage."""
    problems = []
    for key in ("head_setup_commands", "worker_setup_commands"):
        uris = re.findall(r"AIRI_STORAGE_URI=([^'\"\s]+)", " ".join(cfg[key]))
        if not uris or not all(u.startswith(scheme) for u in uris):
            problems.append(f"{key} set AIRI_STORAGE_URI to {uris}, expected {scheme}...")
    return problems


def world_open(rule: Config) -> list[str]:
    """What an AWS ingress rule (IpPermissions item) opens to the whole internet."""
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    if not any(c in WORLD for c in cidrs):
        return []
    # Nothing is meant to be open to everyone, not even SSH; name the private ports it exposes.
    if str(rule.get("IpProtocol")) == "-1":
        return ["all ports"]
    lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
    return [f"port {p}" for p in PRIVATE_PORTS if lo <= p <= hi] or [f"ports {lo}-{hi}"]


def network_problems(cfg: Config) -> list[str]:
    """Nodes only in the pre-made security group / network; no rule open to the internet."""
    problems = []
    provider = cfg["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        for what in world_open(rule):
            problems.append(f"provider.security_group opens {what} to the internet")
    for name, t in cfg.get("available_node_types", {}).items():
        node = t["node_config"]
        # Without these, Ray makes its own group (AWS, SSH open to 0.0.0.0/0) or uses the
        # default network (GCP, whose default-allow-ssh rule is open to 0.0.0.0/0).
        if provider["type"] == "aws" and not node.get("SecurityGroupIds"):
            problems.append(f"{name}: no SecurityGroupIds, Ray would open SSH to the internet")
        if provider["type"] == "gcp":
            for nic in node.get("networkInterfaces") or [{}]:
                where = nic.get("subnetwork") or nic.get("network") or "default"
                if where == "default" or where.endswith("/default"):
                    problems.append(f"{name}: on the default network")
            if not node.get("tags", {}).get("items"):
                problems.append(f"{name}: no network tag for the firewall rules to target")
    return problems


# --- the configs as shipped ---------------------------------------------------------------------


def test_ray_ships_its_cluster_config_schema() -> None:
    assert schema_path().is_file(), f"no cluster-config schema at {schema_path()}"


@pytest.mark.parametrize("name", sorted(STORAGE_SCHEME))
def test_valid_for_the_schema_and_for_ray(name: str) -> None:
    schema = json.loads(schema_path().read_text())
    cfg = load(name)
    jsonschema.validate(cfg, schema)
    prepare(cfg)  # Ray's own checks: head type known, global max_workers >= sum of min_workers


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_heterogeneous_node_types(name: str) -> None:
    assert node_type_problems(prepare(load(name))) == []


@pytest.mark.parametrize("name", sorted(STORAGE_SCHEME))
def test_installs_airi_with_token_auth_private_dashboard_and_object_storage(name: str) -> None:
    cfg = prepare(load(name))
    assert setup_problems(cfg) == []
    assert auth_problems(cfg) == []
    assert storage_problems(cfg, STORAGE_SCHEME[name]) == []
    assert network_problems(cfg) == []


def test_all_configs_pin_the_same_airi_version() -> None:
    pins = {
        name: AIRI_INSTALL.findall(" ".join(load(name)["setup_commands"]))
        for name in STORAGE_SCHEME
    }
    assert len({v for found in pins.values() for v in found}) == 1, pins


def test_readme_opens_only_ssh_and_walks_up_to_down() -> None:
    text = (CONFIG_DIR / "README.md").read_text()
    lines = text.replace("\\\n", " ").splitlines()  # join shell continuation lines
    rules = [
        ln
        for ln in lines
        if "authorize-security-group-ingress" in ln or "firewall-rules create" in ln
    ]
    assert any("authorize-security-group-ingress" in r for r in rules)
    assert any("firewall-rules create" in r for r in rules)
    for rule in rules:
        assert not any(w in rule for w in WORLD), rule
        assert not any(re.search(rf"\b{p}\b", rule) for p in PRIVATE_PORTS), rule
        if "--cidr" in rule or "--source-ranges" in rule:  # from outside: SSH only
            assert re.search(r"--port 22\b|--allow[= ]tcp:22\b", rule), rule
    steps = [text.find(f"ray {step} ") for step in ("up", "dashboard", "job submit", "down")]
    assert -1 not in steps and steps == sorted(steps), steps


# --- the checks catch what they are for ---------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return apply


OPEN_DASHBOARD = [
    "ray stop",
    "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=0.0.0.0",
]
WORLD_RULE = {
    "IpProtocol": "tcp",
    "FromPort": 8000,
    "ToPort": 8265,
    "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
}


@pytest.mark.parametrize(
    "breakage, check",
    [
        (_set("head_start_ray_commands", OPEN_DASHBOARD), auth_problems),
        # Left out, Ray's defaults fill it in, and they start the dashboard on 0.0.0.0.
        (_set("head_start_ray_commands", None), auth_problems),
        (
            _set("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]),
            auth_problems,
        ),
        (_set("head_setup_commands", ["ray get-auth-token --generate"]), auth_problems),
        (_set("cluster_synced_files", []), auth_problems),
        (_set("provider.security_group", {"IpPermissions": [WORLD_RULE]}), network_problems),
        (
            _set("available_node_types.worker_cpu.node_config.SecurityGroupIds", None),
            network_problems,
        ),
        (_set("available_node_types.worker_h100.resources", {"GPU": 8}), node_type_problems),
        (
            _set("available_node_types.worker_l4.node_config.InstanceType", "g5.xlarge"),
            node_type_problems,
        ),
        (_set("available_node_types.worker_cpu.min_workers", 9), node_type_problems),
        (_set("setup_commands", ['pip install "airi-ray[cpu]"']), setup_problems),
        (_set("setup_commands", ["echo export AIRI_STORAGE_URI=/tmp/state"]), storage_problems),
    ],
)
def test_checks_flag_a_broken_aws_config(
    breakage: Callable[[Config], None], check: Callable[..., list[str]]
) -> None:
    cfg = load("aws-heterogeneous.yaml")
    breakage(cfg)
    cfg = prepare(cfg)
    args = (cfg, "s3://") if check is storage_problems else (cfg,)
    assert check(*args) != []


def test_gcp_nodes_on_the_default_network_are_flagged() -> None:
    cfg = prepare(load("gcp-heterogeneous.yaml"))
    del cfg["available_node_types"]["worker_l4"]["node_config"]["networkInterfaces"]
    assert network_problems(cfg) == ["worker_l4: on the default network"]
