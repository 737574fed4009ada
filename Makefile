# geoprime: two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU ops on first use (~2 min); keep the build cached between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export TRITON_CACHE_DIR ?= $(HOME)/.cache/triton
export TORCHINDUCTOR_CACHE_DIR ?= $(HOME)/.cache/torchinductor
export MPLBACKEND ?= Agg
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean-demo

setup: $(STAMP)

# Re-installs only when pyproject.toml changed since the last install (idempotent, fast otherwise).
# Says what it does: the first install downloads a few GB (torch, deepspeed, mlflow) for minutes,
# and pip reports each package as it goes.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "[setup] creating $(VENV) (python3 -m venv)"; python3 -m venv $(VENV); }
	@echo "[setup] installing the pinned dependencies of pyproject.toml into $(VENV): the first time several minutes (a few GB: torch, deepspeed, mlflow...), pip's progress below"
	@start=$$(date +%s); $(PY) -m pip install --disable-pip-version-check -e '.[dev]' \
		&& echo "[setup] done in $$(( $$(date +%s) - start )) s" && touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not dist" $(PYTEST_ARGS)

demo: setup
	$(PY) -m launch demo

bench: setup
	$(PY) benchmarks/bench_vs_reference.py

clean-demo:
	rm -rf outputs/demo
