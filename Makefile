.PHONY: setup test test-fast lint bench repro ui
VENV := .venv/bin

setup:
	bash scripts/setup.sh

test:
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q

test-fast:
	$(VENV)/python -m pytest -q -m "not slow"

lint:
	$(VENV)/ruff check . && $(VENV)/ruff format --check .

bench:
	$(VENV)/python bench/core_overhead.py

repro:
	. $(VENV)/activate && dvc repro

ui:
	$(VENV)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db
