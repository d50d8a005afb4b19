# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project into it first.
# `make lock` regenerates constraints/cpu-py311.txt, the exact versions that `make` installs on
# CPython 3.11 (linux x86_64, CPU torch): run it after changing dependencies in pyproject.toml and
# commit the file. It never touches .venv; the next `make` reinstalls from the new file.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of torch that the development machines carry; override for other builds.
TORCH_SPEC ?= torch==2.13.0
# The lock of the CPU stack (torch + the project + its `dev` extra). Used only for CPython 3.11 on
# linux x86_64, in a venv without system site packages, and when it pins $(TORCH_SPEC); anywhere
# else pip resolves unconstrained (with a note). `make CONSTRAINTS=` turns it off. The `gpu` and
# `sglang` extras are never installed through it: they keep their own pins.
CONSTRAINTS ?= constraints/cpu-py311.txt
LOCK_PY := import sys, platform; sys.exit(not (sys.implementation.name == 'cpython' and sys.version_info[:2] == (3, 11) and sys.platform == 'linux' and platform.machine() == 'x86_64'))
DESCRIBE_PY := import sys, platform; print('CPython' if sys.implementation.name == 'cpython' else sys.implementation.name, sys.version.split()[0], sys.platform, platform.machine())
PYTEST_ARGS ?=
# `make wheelhouse`: the target CPython X.Y (default: $(PYTHON)'s own) and the output folder.
PY ?=
WHEELHOUSE ?= wheelhouse

.PHONY: install demo test lint lock wheelhouse clean docs

install: $(STAMP)

# If the base interpreter already has torch (an NGC container, say), the venv sees it through
# --system-site-packages and it is kept (and nothing is constrained). Otherwise the pinned CPU
# wheel is installed before the project so that pip never resolves a bare `torch` to a multi-GB
# CUDA build; both installs go through $(CONSTRAINTS) where it applies (see above).
$(STAMP): pyproject.toml Makefile $(wildcard $(CONSTRAINTS))
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[make] base python has torch: venv with --system-site-packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@set -e; c=""; \
	if [ -z "$(CONSTRAINTS)" ]; then \
	  echo "[make] note: CONSTRAINTS is empty: unconstrained resolution"; \
	elif [ ! -f "$(CONSTRAINTS)" ]; then \
	  echo "[make] note: $(CONSTRAINTS) is missing (make lock writes it): unconstrained resolution"; \
	elif grep -qi '^include-system-site-packages *= *true' $(VENV)/pyvenv.cfg; then \
	  echo "[make] note: the venv uses the base interpreter's packages (its torch): $(CONSTRAINTS) not applied, unconstrained resolution"; \
	elif ! $(BIN)/python -c "$(LOCK_PY)"; then \
	  echo "[make] note: $(CONSTRAINTS) is for CPython 3.11 on linux x86_64, this is $$($(BIN)/python -c "$(DESCRIBE_PY)"): unconstrained resolution"; \
	elif ! grep -q '^$(TORCH_SPEC)\(+[^ ]*\)\?$$' "$(CONSTRAINTS)"; then \
	  echo "[make] note: $(CONSTRAINTS) does not pin $(TORCH_SPEC): unconstrained resolution"; \
	else \
	  echo "[make] installing the versions pinned in $(CONSTRAINTS)"; c="-c $(CONSTRAINTS)"; \
	fi; \
	$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/python -m pip install $$c "$(TORCH_SPEC)"; \
	echo "$(BIN)/python -m pip install $$c -e \".[dev]\""; \
	$(BIN)/python -m pip install $$c -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/megatron-trace demo

# The pinned SGLang wheel (pure Python, 3.6 MB): the contract tests read and run its own code on CPU
# (tests/sglang_wheel.py), since SGLang itself cannot be installed without CUDA.
SGLANG_WHEEL := .cache/wheels/sglang-0.5.6-py3-none-any.whl

$(SGLANG_WHEEL): | $(STAMP)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --dest .cache/wheels "sglang==0.5.6"

test: $(STAMP) $(SGLANG_WHEEL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check megatron_trace tools launch tests

# The docs site at http://127.0.0.1:8000, rebuilt on every edit; the generated reference pages
# first (tools/gen_docs.py: the config keys and every command's flags).
docs: $(STAMP)
	$(BIN)/python tools/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# Resolves from scratch in a throwaway venv (same interpreter, no system site packages, no
# constraints of ours): $(TORCH_SPEC) first, then the project with its `dev` extra, then writes
# `pip freeze --all` less pip and the project to $(CONSTRAINTS), under a header saying how, where
# and when.
lock:
	@set -e; \
	if ! $(PYTHON) -c "$(LOCK_PY)"; then \
	  echo "[make] lock: $(CONSTRAINTS) is for CPython 3.11 on linux x86_64; $(PYTHON) is $$($(PYTHON) -c "$(DESCRIBE_PY)") (pass PYTHON=python3.11)"; \
	  exit 1; \
	fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp" "$(CONSTRAINTS).tmp"' EXIT; \
	echo "[make] lock: resolving in $$tmp/venv"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install "$(TORCH_SPEC)"; \
	"$$tmp/venv/bin/python" -m pip install -e ".[dev]"; \
	mkdir -p "$$(dirname "$(CONSTRAINTS)")"; \
	{ \
	  echo "# Constraints for the CPU stack of megatron-trace: $(TORCH_SPEC) + the project + its dev extra."; \
	  echo "# Generated by \`make lock\` ($$(date -u +%Y-%m-%d)): a fresh venv of $$("$$tmp/venv/bin/python" -c "$(DESCRIBE_PY)"),"; \
	  echo "# pip $$("$$tmp/venv/bin/python" -m pip --version | cut -d' ' -f2), \`pip install \"$(TORCH_SPEC)\"\`, then \`pip install -e \".[dev]\"\`, then"; \
	  echo "# \`pip freeze --all --exclude-editable\` less pip itself (setuptools stays: torch needs it at run time)."; \
	  echo "# \`make install\` applies it (pip -c) only on CPython 3.11, linux x86_64, without a torch in the"; \
	  echo "# base interpreter. Not for the gpu/sglang extras. Do not edit by hand."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(pip|megatron[-_.]trace)([ =@]|$$)'; \
	} > "$(CONSTRAINTS).tmp"; \
	mv "$(CONSTRAINTS).tmp" "$(CONSTRAINTS)"; \
	echo "[make] lock: wrote $(CONSTRAINTS) ($$(grep -vc '^#' "$(CONSTRAINTS)") pins)"

# Offline wheels for a CUDA machine that already has torch (a GPU box without a package index):
# this project's wheel + its core dependencies (megatron-core, omegaconf, math-verify, transformers,
# ...) for CPython $(PY) on manylinux x86_64, without torch and what torch depends on, at the versions
# of $(CONSTRAINTS) (`make wheelhouse CONSTRAINTS=` resolves unconstrained). Fails (and writes
# nothing) past 60 MiB. Needs no venv: $(PYTHON)'s pip resolves and downloads for the target. Install
# there with `pip install --no-index --find-links wheelhouse megatron-trace` (tools/gpu_smoke.sh does).
wheelhouse:
	$(PYTHON) tools/build_wheelhouse.py --out $(WHEELHOUSE) $(if $(PY),--python-version $(PY)) \
	  $(if $(and $(CONSTRAINTS),$(wildcard $(CONSTRAINTS))),--constraints $(CONSTRAINTS))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(WHEELHOUSE) .cache
