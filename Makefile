# The two set-up commands: `make demo` (the main job end to end) and `make test` (the test suite).
# Both create .venv on first use and are quick when it is already up to date.
#
# TORCH_SPEC chooses the PyTorch build installed before everything else. The default is the CPU
# build of torch 2.13.0; a GPU user sets e.g. TORCH_SPEC='torch==2.13.0' TORCH_INDEX=<their CUDA
# wheel index> (pip's --index-url), or TORCH_SPEC=skip to keep the torch already in the venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo demo-multimodal test install install-dev clean-build

demo: $(VENV)/.installed-base
	$(PY) -m pipelines.demo $(DEMO_ARGS)

# The chart-patch encoder and decision head on rendered price charts (no download): report in
# build/demo-multimodal/report.md. MM_ARGS e.g. '--charts 32000 --steps 2400' or '--force train'.
demo-multimodal: $(VENV)/.installed-base
	$(PY) -m pipelines.demo_multimodal $(MM_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

install: $(VENV)/.installed-base
install-dev: $(VENV)/.installed-dev

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.installed-torch: $(VENV)/.created
	@if [ "$(TORCH_SPEC)" != "skip" ]; then \
	  $(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),); fi
	touch $@

$(VENV)/.installed-base: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.installed-base

clean-build:
	rm -rf build
