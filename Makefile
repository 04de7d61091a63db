# One-command set-up and checks. Everything runs in a virtual environment ($(VENV)) that the
# first target creates: torch, the package with its compiled extension, and the test tools.
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# OpenMP threads sleep as soon as a parallel region ends instead of spinning: on a machine shared
# with other processes spinning threads take the cores from working ones (README, "Threads").
export OMP_WAIT_POLICY ?= PASSIVE
# ... after a short spin, which keeps an idle machine as fast as the default (pccfast/_openmp.py).
export GOMP_SPINCOUNT ?= 1000
# The oldest versions we support: those of the GPU machines (and triton 3.6's interpreter needs
# numpy<2.4). `make test-oldest` tests a copy of the working tree against them.
OLDEST_VENV ?= .venv-oldest
OLDEST_SPEC ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4" "setuptools<82"
OLDEST_TREE := build/oldest
# A toolkit whose nvcc is reached through a wrapper elsewhere on PATH still lives here.
ifeq ($(CUDA_HOME),)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif

.PHONY: install lint test test-fast test-1thread test-oldest demo bench cpp-test info clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*) $(wildcard kernels/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=68" wheel ninja pybind11
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation -e ".[all]"
	$(PY) -m pccfast info
	touch $@

# Lines within 100 characters and pyflakes' checks (pyproject.toml, [tool.ruff]): seconds.
lint: install
	$(VENV)/bin/ruff check --no-cache .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests
	@if command -v cmake >/dev/null; then $(MAKE) --no-print-directory cpp-test; else echo "cmake not found: C++ unit tests skipped"; fi

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# The numerically sensitive tests again on one thread (about a minute on 2 cores): BLAS, LAPACK and the
# kernels may split a reduction another way per thread count, and every tolerance must hold
# for any (each is derived from what its algorithm guarantees, none from one host's output).
NUMERIC_TESTS ?= tests/test_ci.py tests/test_ci_cuda.py tests/test_ci_collector.py \
  tests/test_prune_real_data.py tests/test_pcc.py tests/test_regularizer.py tests/test_ddp.py
test-1thread: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS)

# A copy of the tracked and new (not ignored) files, so the in-place extension built for the
# oldest torch never replaces the one in the working tree.
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade "pip>=23" wheel ninja pybind11
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_SPEC)
	rm -rf $(OLDEST_TREE) && mkdir -p $(OLDEST_TREE)
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(OLDEST_TREE)
	cd $(OLDEST_TREE) && $(abspath $(OLDEST_VENV))/bin/python -m pip install -q \
	  --no-build-isolation -e ".[all]" && $(abspath $(OLDEST_VENV))/bin/python -m pccfast info
	cd $(OLDEST_TREE) && $(abspath $(OLDEST_VENV))/bin/python -m pytest -q -p no:cacheprovider \
	  $(PYTEST_ARGS) tests

demo: install
	$(VENV)/bin/pccfast demo

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,mean,rounds

cpp-test: install
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} cmake -S . -B build/cmake $$($(PY) tests/cpp/cmake_args.py) >/dev/null
	cmake --build build/cmake -j2 --target test_kernels test_jacobi_eigh
	cd build/cmake && ctest --output-on-failure

info: install
	$(PY) -m pccfast info

clean:
	rm -rf build pccfast/_C*.so *.egg-info
