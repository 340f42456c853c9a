# Two entry points for a newcomer (see README):
#   make demo   set up .venv, then run the main job (AFLoRA, 10 clients, AG News, SmolLM2) into runs/demo
#   make test   set up .venv, lint (ruff, mypy), then run the test suite CI runs (tiny models + a representative real-model subset)
# More: make flwr-demo (the main job through `flwr run .`), make federation (the main job on a real local
# deployment: TLS SuperLink + authenticated SuperNodes), make test-all (every test, including the slow
# real-model ones), make setup.

VENV ?= .venv
# Local datasets: $AFLORA_DATA_DIR if set, else ../shared/data when it exists, else the Hugging Face hub.
DATA_DIR ?= $(or $(AFLORA_DATA_DIR),$(wildcard ../shared/data))
DATA_FLAG = $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
PYTEST = $(VENV)/bin/python -m pytest

.PHONY: setup demo flwr-demo federation lint test test-all

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/aflora run --config configs/default.toml --out runs/demo --overwrite $(DATA_FLAG)

# The same job through Flower's own CLI (a local SuperLink in simulation mode). Dependencies are already
# in .venv, so Flower must not install them again (it would resolve torch from the network).
flwr-demo: setup
	FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PATH=$(abspath $(VENV))/bin:$$PATH flwr run . \
	  --federation-config "num-supernodes=10" --stream \
	  --run-config 'out-dir="$(abspath runs/flwr-demo)" $(if $(DATA_DIR),data.data_dir="$(abspath $(DATA_DIR))",)'

# The same job on a real deployment on this machine (docs/deployment.md): a SuperLink with TLS and SuperNode
# authentication, one registered SuperNode per client reading only its own data file, `flwr run`, then everything
# stopped. FEDERATION_CONFIG picks the experiment; FEDERATION_ARGS adds options (e.g. --set rounds=1).
FEDERATION_CONFIG ?= configs/default.toml
federation: setup
	$(VENV)/bin/aflora federation run --config $(FEDERATION_CONFIG) --out runs/federation-run --overwrite $(DATA_FLAG) $(FEDERATION_ARGS)

# Lint first (ruff, and mypy on the method and LoRA layers; both pinned in the `test` extra, settings in
# pyproject.toml), then the tests.
lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/aflora/methods src/aflora/lora

test: lint
	AFLORA_TEST_DATA_DIR=$(DATA_DIR) $(PYTEST) -m "not slow or ci" -q --durations=15

test-all: setup
	AFLORA_TEST_DATA_DIR=$(DATA_DIR) $(PYTEST) -q
