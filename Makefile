# Fresh-machine entry points: each target creates .venv and installs the project into it first.
#   make demo   install, then train MedMamba-T on PneumoniaMNIST with configs/quick.yaml
#   make test   install, then run the test suite (what CI runs)
#   make test-fast  the tests without a Ray cluster, Flower simulation, server or long training (~3 min)
#   make bench  the benchmarks (selective scan, training throughput, ASHA sweep, federation)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build pinned for these machines (on local disk here); override for another platform,
# e.g. make test TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
LINKS := $(VENV)/.linked
PACKAGES := medmamba kernels kernels/csrc orchestrator federated
# Where the demo finds PneumoniaMNIST: the shared copy beside the checkout when there is one,
# else medmnist's default (~/.medmnist), downloading the file when it is missing.
DATA_ROOT ?= $(if $(wildcard ../shared/data/medmnist/pneumoniamnist.npz),../shared/data/medmnist,)
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-fast test-all bench gpu-deps clean

install: $(LINKS)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $@

# Strict editable mode links every file into build/ (a plain folder on sys.path that editors and
# type checkers follow); a file added to a package folder changes the folder, which relinks.
$(LINKS): $(STAMP) $(PACKAGES)
	$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict
	touch $@

demo: install  # a new run each time: the last demo's folder goes first
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/medmamba train --config configs/quick.yaml --output-dir $(DEMO_OUT) \
		$(if $(DATA_ROOT),--set data.root=$(DATA_ROOT))

bench: install
	$(PY) benchmarks/scan.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/federated.py
	$(PY) benchmarks/checkpoint.py

test: install
	$(PY) -m pytest -m "not slow" --durations=25

test-fast: install
	$(PY) -m pytest -m "not slow and not integration"

test-all: install
	$(PY) -m pytest

# The wheels the GPU check's training section imports beyond the lent GPU machine's torch, triton
# and timm (Python 3.12 there): carry .gpu_deps with the run; see README, "The GPU check".
GPU_PYTHON ?= 3.12
GPU_DEPS ?= scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0 cloudpickle==3.1.3 narwhals==2.29.0
gpu-deps: install
	rm -rf .gpu_deps
	$(PY) -m pip download --quiet --only-binary=:all: --no-deps --python-version $(GPU_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_deps $(GPU_DEPS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .gpu_deps
