# Every target installs what it needs into .venv first; `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
HOROVOD := $(VENV)/.horovod

.PHONY: install horovod test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Horovod 0.28.1 built once from its sdist with the C++17 fix (docs/horovod.md, "Installing Horovod"); the wheel
# is cached, so later installs take seconds. Needs the pinned torch first: the build compiles against it.
$(HOROVOD): $(BIN)/python tools/build_horovod.sh
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	tools/build_horovod.sh $(VENV)
	touch $(HOROVOD)

horovod: $(HOROVOD)

# torch is pinned and installed first so pip never resolves an unpinned (CUDA) torch.
$(STAMP): $(BIN)/python pyproject.toml $(HOROVOD)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test,demo,launch]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/scaling-plugins demo

bench: install
	$(BIN)/python -m benchmarks.overhead

clean:
	rm -rf $(VENV) build *.egg-info
