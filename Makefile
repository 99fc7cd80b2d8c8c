# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean peer-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/hyperbooth demo --out demo-output

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# diffusers' example scripts need torchvision, so benchmarks/peer_step_time.py runs them from
# their own environment (torch 2.14.1 + torchvision 0.29.1 here), never .venv.
peer-venv:
	$(PYTHON) -m venv .peer-venv
	.peer-venv/bin/pip install -q --upgrade pip
	.peer-venv/bin/pip install -q -r benchmarks/peer/requirements.txt

clean:
	rm -rf $(VENV) demo-output
