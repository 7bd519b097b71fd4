# The README's commands. Each target creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# nvcc lives here on our machines; torch.utils.cpp_extension finds it through CUDA_HOME.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

.PHONY: install install-dev train demo test test-triton bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first: the extension builds against the torch already in the venv (--no-build-isolation).
$(VENV)/.base: $(VENV)/bin/python
	$(PIP) install "setuptools>=64" wheel ninja numpy "torch>=2.4"
	touch $@

$(VENV)/.installed: $(VENV)/.base setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	$(PIP) install --no-build-isolation -e ".[train,dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train.py $(ARGS)

demo: install
	$(PY) examples/demo_temporal_loss.py $(ARGS)

test: install
	$(PY) -m pytest tests -q $(ARGS)

# Triton kernels on the CPU through the interpreter (slow: tiny shapes only).
test-triton: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m triton $(ARGS)

bench: install
	mkdir -p benchmarks/results/cpu
	cd benchmarks && ../$(PY) -m pytest -q -p no:cacheprovider -o python_files="bench_*.py" . \
		--benchmark-json=results/cpu/bench.json $(ARGS)
	$(PY) benchmarks/render.py benchmarks/results/cpu/bench.json > benchmarks/results/cpu/bench.md
	cat benchmarks/results/cpu/bench.md

# On the GPU machine (uses its python3 and torch, no venv): build, CUDA/Triton tests,
# compute-sanitizer, GPU benchmarks; results in $$OUT or benchmarks/results/<device>/.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build tcloss/_C*.so *.egg-info
