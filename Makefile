PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: install test test-all train pipeline bench serve tensorboard lint format clean

install:  ## install tunelab and its dev tools into the current Python
	$(PIP) install -e ".[dev]"

test:  ## fast tests (what CI runs)
	$(PYTHON) -m pytest -q

test-all:  ## every test, the slow end-to-end runs too
	$(PYTHON) -m pytest -q -m "slow or not slow"

train:  ## the default run: fine-tune a tiny BERT on the embedded reviews
	$(PYTHON) train.py

pipeline:  ## MLM pretraining -> fine-tuning -> distillation -> compression -> predictions, then one summary table
	$(PYTHON) -m tunelab.pipeline

serve:  ## serve the latest fine-tuned model on http://127.0.0.1:8000 (POST /predict, GET /health, GET /info)
	$(PYTHON) serve.py model=logs/finetune/latest

bench:  ## throughput ratios against bare PyTorch loops, measured in the same run
	$(PYTHON) -m tunelab.bench

tensorboard:
	tensorboard --logdir logs

lint:
	ruff check .

format:
	ruff format . && ruff check --fix .

clean:
	rm -rf logs/*/ .cache .pytest_cache
