# Two commands do all set-up on a fresh machine (Python 3.11 + pip):
#   make demo   - create .venv, install, run the quickstart (every stage, report, bento)
#   make test   - create .venv, install with test extras, run the test suite
#   make lint   - ruff, import-linter (stage layering), hadolint
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

# The report's browser test needs Debian's chromium: installed here when missing and running as root
# (never fatal: without it that test skips with the reason).
test: $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the report browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed: the browser test will be skipped"; fi
	$(PY) -m pytest -q

# ruff (pyflakes, pycodestyle, import order), the stage layering (import-linter contracts in
# pyproject.toml) and the Dockerfile (hadolint); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) runs
