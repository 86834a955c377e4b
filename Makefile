# Fresh-machine entry points: each target creates .venv and installs the project into it first.
#   make demo   install, then train MedMamba-T on PneumoniaMNIST with configs/quick.yaml
#   make test   install, then run the test suite (what CI runs)
#   make bench  the benchmarks (selective scan, training throughput, ASHA sweep, federation)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build pinned for these machines (on local disk here); override for another platform,
# e.g. make test TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Where the demo finds PneumoniaMNIST: the shared copy beside the checkout when there is one,
# else medmnist's default (~/.medmnist), downloading the file when it is missing.
DATA_ROOT ?= $(if $(wildcard ../shared/data/medmnist/pneumoniamnist.npz),../shared/data/medmnist,)
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/medmamba train --config configs/quick.yaml --output-dir $(DEMO_OUT) \
		$(if $(DATA_ROOT),--set data.root=$(DATA_ROOT))

bench: install
	$(PY) benchmarks/scan.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/sweep.py
	$(PY) benchmarks/federated.py

test: install
	$(PY) -m pytest -m "not slow"

test-all: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
