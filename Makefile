# The two commands of the README: `make demo` and `make test`. Both create/update .venv
# themselves (PyPI only, the exact versions of requirements.lock), then run. `make test` (what
# CI runs) runs the linter and every test; `make test-fast` all but the tests marked slow
# (multi-process, end-to-end, long training), the inner loop while editing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lvis_longtail-installed
DATA   ?= datasets/lt_synthetic
DEMO_CONFIG ?= configs/tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml

# TORCH=pinned (default): the torch/torchvision of requirements.lock, CUDA 13 builds that need
# an NVIDIA driver >= 580. TORCH=keep: the torch/torchvision already installed in .venv (e.g. a
# CUDA 12 build for a 535/550/570 driver) stay; the rest of the lock is installed without
# torch, torchvision, triton and the CUDA 13 packages, with the kept versions as pins (pip
# stops instead of replacing them).
TORCH ?= pinned
TORCH_PACKAGES := torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+
ifeq ($(TORCH),pinned)
LOCK := requirements.lock
else ifeq ($(TORCH),keep)
LOCK := .cache/requirements.keep-torch.lock
else
$(error TORCH must be "pinned" (default) or "keep", not "$(TORCH)")
endif

.PHONY: setup test test-fast demo data lint clean gpu-wheels gpu-check

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml lvis_longtail/tools/install_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==25.3
ifeq ($(TORCH),keep)
	mkdir -p .cache
	$(BIN)/python -c "import torch, torchvision; print(f'torch=={torch.__version__}\\ntorchvision=={torchvision.__version__}')" > .cache/torch-kept.txt || { echo "TORCH=keep: install torch and torchvision into $(VENV) first, e.g. $(BIN)/pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126"; exit 1; }
	grep -vE '^($(TORCH_PACKAGES))==' requirements.lock | cat - .cache/torch-kept.txt > $(LOCK)
endif
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python lvis_longtail/tools/install_detectron2.py --cache .cache --constraint $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

$(DATA)/annotations/lt_synthetic_train.json: | setup
	$(BIN)/python -m lvis_longtail.data.synthetic --out $(DATA)

data: $(DATA)/annotations/lt_synthetic_train.json

# Train on the synthetic train split, then evaluate on val (AP, APr/APc/APf) and export the
# test-dev results file: OUTPUT_DIR/inference/lt_synthetic_test_dev/lvis_instances_results.json
demo: setup data
	DETECTRON2_DATASETS=$(dir $(DATA)) $(BIN)/python train_net.py --config-file $(DEMO_CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache output

# The prepared GPU check (docs/gpu_check.md). gpu-wheels (here, with a package registry): the
# cp312 wheels a GPU machine with its own torch lacks, into .whl/. gpu-check (there): installs
# them into a temporary folder and runs the check, logs in $OUT; ARGS=--dry-run runs it on
# the CPU of any machine with the local environment.
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_wheels.py --out .whl

gpu-check:
	bash benchmarks/gpu_check.sh $(ARGS)
