# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FACES := .faces-venv
FACES_STAMP := $(FACES)/.installed
FACENET := facenet-pytorch==2.6.0

.PHONY: demo test lint format clean peer-venv faces-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/hyperbooth demo --out demo-output

test: $(STAMP) $(FACES_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest
	$(FACES)/bin/python -m pytest tests/test_faces.py

# Face similarity (hyperbooth eval --face) needs facenet-pytorch, hence torchvision, hence (here)
# torch 2.14.1: its own environment beside .venv. Core pins come from pyproject.toml.
$(FACES_STAMP): pyproject.toml requirements/faces.txt
	$(PYTHON) -m venv $(FACES)
	$(FACES)/bin/pip install -q --upgrade pip
	$(FACES)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['dev'] \
	if not d.startswith('torch')))" > $(FACES)/core-requirements.txt
	$(FACES)/bin/pip install -q -r requirements/faces.txt -r $(FACES)/core-requirements.txt
	$(FACES)/bin/pip install -q --no-deps $(FACENET) -e .
	touch $(FACES_STAMP)

faces-venv: $(FACES_STAMP)

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
	rm -rf $(VENV) $(FACES) demo-output
