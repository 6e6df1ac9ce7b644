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

# Debian packages some tests need, installed here when missing: chromium for the report's browser test;
# Orthanc with its DICOMweb plugin and dcmtk for the DICOM gateway's tests against a real PACS; PostgreSQL
# for the prediction log shared by several replicas. As root with
# apt-get (CI) a failed install fails the run, so those tests never skip there by accident; elsewhere they
# skip with the reason.
test: $(STAMP)
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	command -v dsrdump >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing for the browser and PACS tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/tmp/remedis-apt.log 2>&1 \
		|| { tail -20 /tmp/remedis-apt.log; echo "make test: could not install$$missing (apt-get failed; log above)"; exit 1; }; fi
	$(PY) -m pytest -q

# ruff (pyflakes, pycodestyle, import order), the stage layering (import-linter contracts in
# pyproject.toml) and the Dockerfile (hadolint); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/bandit -q -r remedis serving

clean:
	rm -rf $(VENV) runs
