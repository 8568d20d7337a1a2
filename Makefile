PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install install-core demo test

# lorakit with what a user needs (the demo runs on it: no bitsandbytes, peft, pytest or trackers)
install-core:
	$(PIP) torch==2.13.0
	$(PIP) -e .

# the dev set-up: lorakit with every extra, peft for the interop tests, pytest
install: install-core
	$(PIP) -e ".[dev]"

# Quick start 1: install and run the offline demo (a LoRA fine-tune of the shipped model).
demo: install-core
	$(PYTHON) -m lorakit train

# Quick start 2: install and run the test suite (offline).
test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q tests
