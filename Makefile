PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install demo test bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

# Quick start 1: install and run the offline demo (a LoRA fine-tune of the shipped model).
demo: install
	$(PYTHON) -m lorakit train

# Quick start 2: install and run the test suite (offline).
test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q tests
