# Set-up and entry points. `make test` and `make train` work on a fresh machine: they create
# .venv, install the pinned CPU torch first, then the package (C++ extension built in place,
# without build isolation so it compiles against that torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0

.PHONY: install test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt constraints.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel
	$(PIP) install -q -c constraints.txt "$(TORCH)"
	$(PIP) install -q -c constraints.txt cmake ninja
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[dev,bench,trl]"
	$(BIN)/python -c "import aft_fast, aft_fast._C; print('aft_fast', aft_fast.__version__, aft_fast._C.build_info()['cpu_capability'])"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# Ruff and mypy at the versions pinned in constraints.txt (the dev extra); configuration in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/python -m mypy

# The whole method (vft, eval, sample, aft, eval) on the embedded default task: DeepSpeed ZeRO-3 on
# 2 CPU processes (gloo), on a free port. Outputs and the summary table: runs/default/.
.PHONY: train
train: install
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 \
		--master_port $$($(BIN)/python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])') \
		train.py --config configs/default.yaml

bench: install
	$(BIN)/python benchmarks/bench_loss.py

clean:
	rm -rf build *.egg-info aft_fast/_C*.so
