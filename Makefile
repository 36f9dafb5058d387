# prunekit: `make demo` and `make test` each do the whole set-up, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup setup-vision data demo test test-vision lint bench clean

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
	$(BIN)/ruff check prunekit tests tests_vision bench

# two workers (one torch thread each, a test file per worker): the 2-core machines' cores
test: setup data lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

# A second environment for the real model zoos (torchvision, timm, transformers): torchvision
# needs its matching torch, a larger build than the default CPU wheel. The pip constraint keeps
# every later install (timm, transformers, prunekit itself) from replacing that torch.
VVENV := .venv-vision
VBIN  := $(VVENV)/bin
$(VBIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VVENV)
	@case "$$(uname -m)" in \
		aarch64|arm64) echo "torch==2.9.1" > $(VVENV)/torch-pin.txt; echo "torchvision==0.24.1" >> $(VVENV)/torch-pin.txt;; \
		*) echo "torch==2.14.1" > $(VVENV)/torch-pin.txt; echo "torchvision==0.29.1" >> $(VVENV)/torch-pin.txt;; \
	esac
	$(VBIN)/pip install --quiet -r $(VVENV)/torch-pin.txt
	$(VBIN)/pip install --quiet -c $(VVENV)/torch-pin.txt timm transformers safetensors torch-pruning onnx onnxruntime
	$(VBIN)/pip install --quiet -c $(VVENV)/torch-pin.txt -e '.[dev]'
	$(VBIN)/python -c "import torch, torchvision, timm, transformers; print('vision env: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
	touch $@

setup-vision: $(VBIN)/.installed

# the model-zoo coverage tests (tests_vision/, not collected by `make test`)
test-vision: setup-vision data
	OMP_NUM_THREADS=1 $(VBIN)/python -m pytest -n 2 --dist load tests_vision

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info .pytest_cache
