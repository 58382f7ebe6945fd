# Two commands on a fresh machine:  `make demo`  and  `make test`  (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup demo test test-slow gpu-check clean

setup: $(VENV)/.installed

# torch and torchvision are installed first, pinned, by pip (which finds this machine's local wheels);
# then vlmfit and every dependency at the exact version CI tested (constraints.txt).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/vlmfit demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

# On a CUDA machine: the gpu-marked tests (bf16 SFT, QLoRA, DPO, zo, plan vs measured), figures in gpu-check.json.
gpu-check: setup
	$(PY) -m pytest -m gpu -p no:cacheprovider -o addopts='' -q --timeout 480 tests/test_gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
