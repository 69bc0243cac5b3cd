VENV ?= .venv
STAMP := $(VENV)/.installed
# Offline-safe defaults for everything the Makefile runs (no hub, no wandb network).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test wheel lock-cpu lock-gpu wheelhouse wheelhouse-check wheelhouse-sdists

install: $(STAMP)

# uv installs the locked set (constraints-cpu.txt) and compiles its bytecode in ~64 s where pip takes ~97 (measured
# on the 2-core box, same lock). The bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is
# set nothing would write it later, and every process would compile torch and transformers again (15 s, not 5). uv reads no pip.conf: tools/uv_env.py hands it the find-links, indexes,
# constraints and certificate pip is configured with (local wheels and mirrors, such as a CPU torch wheel on disk).
$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	eval "$$(python3 tools/uv_env.py)" && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -c constraints-cpu.txt -e ".[dev,eval]"
	# lmms-eval pulls a torchvision that cannot import beside CPU torch 2.13.0 and breaks transformers' imports
	$(VENV)/bin/uv pip uninstall -q --python $(VENV)/bin/python torchvision
	touch $(STAMP)

# The main job on its embedded default: the whole pipeline on the procedural shapes world (configs/shapes.yaml):
# world, stage-0 teacher, both tokenizer stages, pre-tokenization, the unified LLM, sampling and evaluation.
# The shipped photo sample is one flag away: semhitok pipeline --config tiny
demo: $(STAMP)
	$(VENV)/bin/semhitok pipeline --config shapes

# A wheel carrying the presets, the DeepSpeed JSONs and the shipped sample (semhitok/configs, semhitok/data).
wheel:
	python3 -m pip wheel --no-deps -w dist .

# The GPU set: pyproject's dependencies with EXTRAS resolved by uv for the GPU image's Python (PY) and platform
# (PLATFORM, pip's spelling) around the base image's torch (docker/Dockerfile's FROM tag), every version pinned in
# LOCK. The image installs it before copying the source; `make wheelhouse` downloads it. Regenerate after a
# change to pyproject's dependencies or to the base image: `pip install uv && make lock-gpu`.
PY ?= 3.11
PLATFORM ?= manylinux_2_28_x86_64
EXTRAS ?= gpu,eval
LOCK ?= constraints-gpu.txt
UV ?= uv
comma := ,
BASE_TORCH := $(shell sed -n 's|^FROM pytorch/pytorch:\([0-9.]*\)-.*|\1|p' docker/Dockerfile)
UV_PLATFORM = $(shell echo $(PLATFORM) | sed -E 's/^(manylinux_[0-9]+_[0-9]+|manylinux[0-9]+|musllinux_[0-9]+_[0-9]+)_(.+)$$/\2-\1/')

# The CPU set (make install, CI): every version pinned for Python 3.11 on any platform (uv's --universal) around
# CPU_TORCH (a machine with a CPU wheel of it in a find-links folder takes that one; PyPI's Linux torch is CUDA's)
# and megatron-core 0.16.1, the last release for Python 3.11. Regenerate after a change to pyproject's
# dependencies: `make lock-cpu` (uv keeps the versions already in the file where it can).
CPU_TORCH ?= 2.13.0
lock-cpu:
	@command -v $(UV) >/dev/null || { echo "make lock-cpu: no $(UV) on PATH (pip install uv)" >&2; exit 2; }
	printf 'torch==$(CPU_TORCH)\nmegatron-core==0.16.1\n' | $(UV) pip compile -q pyproject.toml - --extra dev --extra eval \
	    --python-version 3.11 --universal -o constraints-cpu.txt --custom-compile-command "make lock-cpu"

lock-gpu:
	@command -v $(UV) >/dev/null || { echo "make lock-gpu: no $(UV) on PATH (pip install uv)" >&2; exit 2; }
	echo "torch==$(BASE_TORCH)" | $(UV) pip compile -q pyproject.toml - $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
	    --python-version $(PY) --python-platform $(UV_PLATFORM) -o $(LOCK) \
	    --custom-compile-command "make lock-gpu PY=$(PY) PLATFORM=$(PLATFORM) EXTRAS=$(EXTRAS)"

# Air-gapped installs: every wheel that `pip install semhitok[EXTRAS]` needs on a machine with Python PY on
# PLATFORM, gathered in OUT on a machine online, at LOCK's versions (the CPU set: LOCK=constraints-cpu.txt).
# Binaries come from pip download for the target; the packages PyPI has only as sdists (SDISTS, pure
# Python) are built into wheels here. On the target:
#   pip install --no-index --find-links wheelhouse "semhitok[gpu,eval]"
# pip evaluates environment markers with this interpreter: gather with the target's Python version.
OUT ?= wheelhouse
PIP ?= python3 -m pip
SDISTS ?= deepspeed antlr4-python3-runtime transformers-stream-generator zss
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# pip takes a platform tag literally (only manylinux2014/2010 widen to older ones): manylinux_2_28_x86_64 also
# stands for manylinux_2_27 ... manylinux_2_17 and manylinux2014, as on the target.
PLATFORMS = $(shell n=$$(echo $(PLATFORM) | sed -nE 's/^manylinux_2_([0-9]+)_.+/\1/p'); arch=$$(echo $(PLATFORM) | sed -E 's/^manylinux_2_[0-9]+_//'); \
    if [ -n "$$n" ]; then seq -f "manylinux_2_%g_$$arch" $$n -1 17; echo manylinux2014_$$arch; else echo $(PLATFORM); fi)

TARGET = --only-binary=:all: --python-version $(PY) --implementation cp $(foreach p,$(PLATFORMS),--platform $(p)) \
    --find-links $(OUT) -c $(LOCK) "$(OUT)/semhitok-$(VERSION)-py3-none-any.whl$(if $(EXTRAS),[$(EXTRAS)])"

wheelhouse: wheelhouse-sdists
	$(PIP) download -q -d $(OUT) $(TARGET)
	@echo "$(OUT): $$(ls $(OUT) | wc -l) wheels; install with no index: pip install --no-index --find-links $(OUT) \"semhitok$(if $(EXTRAS),[$(EXTRAS)])\""

# The same resolution from the index's metadata alone (pip install --dry-run downloads no binary): every package of
# LOCK has a wheel for the target. A minute, megabytes; run it after `make lock-gpu`.
wheelhouse-check: wheelhouse-sdists
	$(PIP) install -q --dry-run --ignore-installed --target "$$(mktemp -d)" --report $(OUT)/report.json $(TARGET)
	@echo "$(LOCK): every package has a wheel for Python $(PY) on $(PLATFORM) (the set: $(OUT)/report.json)"

wheelhouse-sdists:
	@test -f $(LOCK) || { echo "make wheelhouse: no lock file $(LOCK)" >&2; exit 2; }
	mkdir -p $(OUT)
	$(PIP) wheel -q --no-deps -w $(OUT) .
	$(PIP) wheel -q --no-deps -w $(OUT) -c $(LOCK) $(SDISTS)

# System tools the tests use: Debian's Chromium + chromedriver (the chat demo's browser test) and
# shellcheck (launch scripts).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/shellcheck
$(SYSTEM_TOOLS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver shellcheck >/dev/null

# --durations: the 25 slowest tests, printed after the summary (where the suite's time goes). Two pytest-xdist
# workers (TEST_WORKERS; 0: one process), each test file on one worker (its module fixtures built once), the
# slowest files first (tests/conftest.py SLOWEST_FIRST; xdist would otherwise put the files with most tests first).
TEST_WORKERS ?= 2
test: $(STAMP) $(SYSTEM_TOOLS)
	$(VENV)/bin/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
