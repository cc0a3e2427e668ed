# Quick start: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv, install torch + the package (editable, with its extension) and run.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_PINS  ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME   ?= $(shell [ -d /usr/local/cuda ] && echo /usr/local/cuda)
export CUDA_HOME
STAMP       := $(VENV)/.nern_fast-installed
SOURCES     := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
PYTEST_ARGS ?=

.PHONY: all install test demo bench bench-quick gpu-check clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.torch-installed: | $(PY)
	$(PY) -m pip install -q $(TORCH_PINS)
	touch $@

$(STAMP): $(SOURCES) $(VENV)/.torch-installed
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 1; exit $$rc

demo: $(STAMP)
	$(PY) -m nern_fast demo --out runs/demo --overwrite

bench-quick: $(STAMP)
	$(PY) -m nern_fast bench --quick --out bench/results

bench: $(STAMP)
	$(PY) -m nern_fast bench --out bench/results

clean:
	rm -rf build *.egg-info nern_fast/_C*.so
