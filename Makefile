# The two commands of the README: `make demo` and `make test`. Both create/update .venv
# themselves (PyPI only, the exact versions of requirements.lock), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lvis_longtail-installed
DATA   ?= datasets/lt_synthetic
DEMO_CONFIG ?= configs/tiny/mask_rcnn_R18_FPN_tiny_softmax.yaml

.PHONY: setup test demo data lint clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml lvis_longtail/tools/install_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==25.3
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python lvis_longtail/tools/install_detectron2.py --cache .cache --constraint requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

$(DATA)/annotations/lt_synthetic_train.json: | setup
	$(BIN)/python -m lvis_longtail.data.synthetic --out $(DATA)

data: $(DATA)/annotations/lt_synthetic_train.json

# Train on the synthetic train split, then evaluate on val (AP, APr/APc/APf) and export the
# test-dev results file: OUTPUT_DIR/inference/lt_synthetic_test_dev/lvis_instances_results.json
demo: setup data
	DETECTRON2_DATASETS=$(dir $(DATA)) $(BIN)/python train_net.py --config-file $(DEMO_CONFIG)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache output
