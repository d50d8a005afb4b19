# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of torch that the development machines carry; override for other builds.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

install: $(STAMP)

# If the base interpreter already has torch (an NGC container, say), the venv sees it through
# --system-site-packages and it is kept. Otherwise the pinned CPU wheel is installed before the
# project so that pip never resolves a bare `torch` to a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[make] base python has torch: venv with --system-site-packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/megatron-trace demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check megatron_trace tools launch tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
