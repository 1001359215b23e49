# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
# torch is installed first and pinned (an unpinned torch would take the newest release). Which build pip takes
# depends on where it finds torch: a CPU wheel where the pip configuration provides one, else PyPI's default,
# which on Linux is the multi-GB CUDA build. TORCH_INDEX_URL chooses, e.g.
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     (or .../whl/cu128 for CUDA 12.8)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=

SKY_VENV := .venv-sky
SKYPILOT_VERSION ?= 0.14.1

.PHONY: demo test setup sky clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# NOTE: skypilot's pins (click < 8.2, uvicorn < 0.36) clash with transformers' and the server's: its own
# environment, used only by tests/deploy/test_skypilot.py to validate deploy/skypilot/*.yaml.
$(SKY_VENV)/.installed:
	$(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install -q skypilot==$(SKYPILOT_VERSION)
	touch $@

sky: $(SKY_VENV)/.installed

demo: setup
	$(PY) -m lmforge.demo

test: setup sky
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(SKY_VENV) runs
