# Kiln's two entry points are `make demo` and `make test`; everything else here serves them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
export UV_LINK_MODE ?= copy

.PHONY: test demo cluster lint typecheck pytest controlplane tools venv crds images test-trainer-image

venv: $(VENV)/.synced

# The lock pins every dependency; uv's cache (~/.cache/uv) makes a fresh clone's install cheap. uv writes no
# bytecode unless asked, and where PYTHONDONTWRITEBYTECODE is set nothing ever does: every process the tests start
# would compile what it imports again (`import torch`: 3.7 s instead of 1.5 s here).
$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	uv sync --all-extras --frozen --compile-bytecode
	@touch $@

controlplane:
	@bash controlplane/build.sh

# helm, prometheus/promtool, lua, buildah, kueue, Kubeflow's training-operator (the benchmark's peer): pinned, cached
# outside the clone (tools/README.md).
tools:
	@bash tools/install-all.sh

# The Dockerfile's operator and trainer images, built with buildah (no daemon). BASE_IMAGE=local (the default)
# builds the base with debootstrap; BASE_IMAGE=docker.io/library/python:3.11-slim uses the public one.
images: tools
	bash tools/images.sh build operator
	bash tools/images.sh build trainer

# The slow tier, not part of `make test`: build the multi-GB trainer image and train one epoch inside it.
test-trainer-image: venv tools
	KILN_TEST_TRAINER_IMAGE=1 $(PY) -m pytest tests/images/test_images.py -k trainer_image -s $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy and import-linter cannot follow the package-dir mapping (kiln.operator -> operator/), so both check a
# symlinked tree with the installed shape; otherwise every kiln.operator/kiln.trainer import would be unseen.
typecheck: venv
	@rm -rf build/typecheck && mkdir -p build/typecheck/kiln
	@for entry in kiln/*; do ln -s "$(CURDIR)/$$entry" build/typecheck/kiln/; done
	@ln -s "$(CURDIR)/operator" build/typecheck/kiln/operator && ln -s "$(CURDIR)/trainer" build/typecheck/kiln/trainer
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p kiln
	cd build/typecheck && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports --config $(CURDIR)/pyproject.toml --no-cache

crds: venv
	$(VENV)/bin/kiln crds

# Two xdist workers: every test of the real control plane runs on one of them (one session cluster; its pods use
# fixed host ports, tests/conftest.py), the torch-heavy rest on the other. `PYTEST_WORKERS=` runs one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup
# pytest's exit code 5 means "no tests collected"; that is not a failure of the suite.
pytest: venv controlplane tools
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test: lint typecheck pytest

demo: venv
	$(PY) -m kiln.trainer.demo

cluster: venv controlplane
	$(PY) -m kiln.testing.cluster
