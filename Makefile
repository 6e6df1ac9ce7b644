# Two commands do all set-up on a fresh machine (Python 3.11 + pip):
#   make demo   - create .venv, install, run the quickstart (every stage, report, bento)
#   make test   - create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/remedis run configs/quickstart.yaml --output runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) runs
