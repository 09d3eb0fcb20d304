# Two commands for a newcomer: `make demo` and `make test`. Both run `make setup` first.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
DATA    ?= data_cache/demo

.PHONY: setup test test-fast test-megatron lint demo data bench clean

setup: $(STAMP)

# Rebuilt only when the lock or the requirement list changes, so `make setup` is idempotent and cheap.
$(STAMP): requirements/lock.txt requirements/dev.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# DeepSpeed builds from source; without CUDA it must not try to compile its ops.
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -c requirements/lock.txt -r requirements/dev.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q tests/unit

lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

data: setup
	$(VPY) -m mtp_plugin.data prepare --out $(DATA)

demo: data
	$(VPY) -m mtp_plugin.demo --data $(DATA)

clean:
	rm -rf $(VENV) data_cache outputs multirun runs
