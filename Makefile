# One entry point for developers and CI. Every target bootstraps what it needs.
SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.8
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
RUN := $(UV) run --frozen --extra dev

.PHONY: help install run test test-compiled lint typecheck format bench bench-peers bench-compiled bench-profile compile uncompile fuzz fuzz-atheris deploy-tools clean

help:  #? list targets
	@grep -E '^[a-z-]+:.*#\?' $(MAKEFILE_LIST) | sed -E 's/:.*#\?/\t/'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

.venv/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --extra dev
	touch $@

install: .venv/.installed  #? create .venv with the project and its dev extras (pinned by uv.lock)

RUN_OUTPUT ?= runs/latest
run: install  #? run the main job on its embedded default workload; results in RUN_OUTPUT (runs/latest)
	$(RUN) credit-router run --output $(RUN_OUTPUT)

test: install  #? run the whole test suite
	$(RUN) pytest -q

lint: install  #? ruff lint and format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: install  #? apply ruff format and safe fixes
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

typecheck: install  #? mypy --strict on the packages
	$(RUN) mypy

bench: install  #? benchmarks, printed as JSON lines
	$(RUN) credit-router bench core --json
	$(RUN) credit-router bench e2e --json
	$(RUN) python -m loadgen.bench.pacing --json
	$(RUN) python -m loadgen.bench.worker --json

# Optional mypyc build of the per-credit modules (scripts/mypyc_build.py lists them) into build/mypyc,
# enabled through a .pth in .venv. A guard hashes the sources at interpreter start and ignores the
# whole build (one line on stderr) once any of them is edited; CREDIT_ROUTER_INTERPRETED=1 skips it.
compile: install  #? mypyc-compile the routing core and peer links (optional; `make uncompile` undoes)
	$(UV) run --frozen --extra dev --with "setuptools>=80" python scripts/mypyc_build.py \
		"$$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

uncompile:  #? remove the mypyc build and its .pth: back to the interpreted sources
	rm -rf build/mypyc build/mypyc-tmp
	rm -f .venv/lib/python*/site-packages/credit_router_mypyc.pth

# The compiled build must pass what the sources pass (make test runs the sources): the core's,
# the service's and the pair tier's tests again on it, then the build is removed.
test-compiled: compile  #? the router's tests again on the mypyc build (make compile), then make uncompile
	$(RUN) python -c 'import router_service.core.router as r; assert not r.__file__.endswith(".py"), r.__file__' \
		&& $(RUN) pytest -q -p no:cacheprovider tests/router_service tests/pair tests/protocol tests/credit_common; \
		rc=$$?; $(MAKE) --no-print-directory uncompile; exit $$rc

bench-compiled: compile  #? bench core compiled (make compile) vs interpreted, alternating, as ratios
	$(RUN) python -m loadgen.bench.compiled

# py-spy (a sampling profiler, so the router runs at full speed) goes into a throwaway venv.
PYSPY_VENV := $(TOOLS)/py-spy-venv
PROFILE_TARGET ?= router
bench-profile: install  #? µs per credit by function, end to end, sampled (PROFILE_TARGET=router|worker)
	test -x $(PYSPY_VENV)/bin/py-spy || { $(UV) venv --quiet $(PYSPY_VENV) && \
		$(UV) pip install --quiet --python $(PYSPY_VENV)/bin/python "py-spy>=0.4,<0.5"; }
	$(RUN) python -m loadgen.bench.profile --py-spy $(PYSPY_VENV)/bin/py-spy --target $(PROFILE_TARGET)

# AIPerf goes into a throwaway venv under .tools (never .venv): the newest release on PyPI unless
# AIPERF_SPEC pins one (e.g. AIPERF_SPEC="aiperf==0.13.0"). Recreated on every run so "newest" holds.
AIPERF_SPEC ?= aiperf
AIPERF_VENV := $(TOOLS)/aiperf-venv
bench-peers: install  #? our core vs AIPerf's StickyCreditRouter, same closed loop, one table (AIPERF_SPEC=aiperf)
	rm -rf $(AIPERF_VENV)
	$(UV) venv --quiet $(AIPERF_VENV)
	$(UV) pip install --quiet --python $(AIPERF_VENV)/bin/python "$(AIPERF_SPEC)"
	$(RUN) python -m loadgen.bench.peers --aiperf-python $(AIPERF_VENV)/bin/python

# The fuzz tests run briefly in `make test`; here each gets FUZZ_EXAMPLES examples (default 5000).
fuzz: install  #? long fuzz run of the decoders and the router (FUZZ_EXAMPLES=5000 per test)
	HYPOTHESIS_PROFILE=fuzz-long $(RUN) pytest tests/fuzz tests/pair/test_interleavings.py -q --timeout=0

# atheris is not a project dependency: installed into .venv on demand, for this target only.
FUZZ_SECONDS ?= 300
fuzz-atheris: install  #? coverage-guided decoder fuzz with atheris (FUZZ_SECONDS=300)
	$(UV) pip install --quiet --python .venv/bin/python "atheris==3.0.0"
	$(RUN) python tests/fuzz/atheris_decoders.py -max_total_time=$(FUZZ_SECONDS)

# Debian packages the deploy/ tests run: prometheus + promtool (tests/integration/test_prometheus.py,
# tests/deploy/test_prometheus_rules.py) and systemd-analyze (tests/deploy/test_systemd.py).
# Installed only when missing, so a second run costs nothing; apt's chatter goes to a log shown
# only on failure. Needs root (or sudo).
DEPLOY_APT := $(if $(shell command -v prometheus),,prometheus) \
	$(if $(shell command -v promtool),,prometheus) \
	$(if $(shell command -v systemd-analyze),,systemd)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

deploy-tools:  #? install prometheus, promtool and systemd-analyze from Debian if missing
	@pkgs="$(sort $(strip $(DEPLOY_APT)))"; \
	if [ -n "$$pkgs" ]; then \
		echo "deploy-tools: apt-get install $$pkgs"; \
		log=$$(mktemp); \
		{ $(SUDO) apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive \
		    apt-get install -y -qq --no-install-recommends $$pkgs; } >"$$log" 2>&1 \
		|| { cat "$$log"; rm -f "$$log"; exit 1; }; \
		rm -f "$$log"; \
	fi

clean:  #? remove the environment and caches
	rm -rf .venv $(TOOLS) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
