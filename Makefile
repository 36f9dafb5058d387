# prunekit: `make demo` and `make test` each do the whole set-up, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# Real Fashion-MNIST from Debian's package (no download at run time). Missing data fails the
# target under CI=true, and fails the tests that read it everywhere (they never skip).
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi
	@if [ ! -d $(FMNIST) ]; then \
		case "$$CI" in true|1|yes) \
			echo "error: $(FMNIST) missing (apt-get install dataset-fashion-mnist); CI needs the real data" >&2; \
			exit 1;; \
		esac; \
		echo "warning: $(FMNIST) missing; the real-data tests will FAIL (apt-get install dataset-fashion-mnist)" >&2; \
	fi

demo: setup data
	$(BIN)/prunekit demo

lint: setup
	$(BIN)/ruff check prunekit tests bench

# two workers (one torch thread each, a test file per worker): the 2-core machines' cores
test: setup data lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
