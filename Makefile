VENV ?= .venv
STAMP := $(VENV)/.installed
# Offline-safe defaults for everything the Makefile runs (no hub, no wandb network).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test wheel

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e ".[dev,eval]"
	# lmms-eval pulls a torchvision that cannot import beside CPU torch 2.13.0 and breaks transformers' imports
	$(VENV)/bin/pip uninstall -y -q torchvision
	touch $(STAMP)

# The main job on its embedded default: the whole pipeline on the procedural shapes world (configs/shapes.yaml):
# world, stage-0 teacher, both tokenizer stages, pre-tokenization, the unified LLM, sampling and evaluation.
# The shipped photo sample is one flag away: semhitok pipeline --config tiny
demo: $(STAMP)
	$(VENV)/bin/semhitok pipeline --config shapes

# A wheel carrying the presets, the DeepSpeed JSONs and the shipped sample (semhitok/configs, semhitok/data).
wheel:
	python3 -m pip wheel --no-deps -w dist .

# System tools the tests use: Debian's Chromium + chromedriver (the chat demo's browser test) and
# shellcheck (launch scripts).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/shellcheck
$(SYSTEM_TOOLS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver shellcheck >/dev/null

test: $(STAMP) $(SYSTEM_TOOLS)
	$(VENV)/bin/python -m pytest -q tests
