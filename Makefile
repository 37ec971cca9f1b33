# make test  - unit, integration and real-Open-WebUI e2e tests (ORP_E2E_VERSIONS)
# make demo  - Open WebUI with the pipe on http://127.0.0.1:8080 (DEMO_ARGS="--version 0.6.28 --port 8081")

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ORP_E2E_VERSIONS ?= 0.12.4 0.6.28
export ORP_E2E_VERSIONS

.PHONY: test demo

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	@rc=0; $(VENV)/bin/python -m pytest tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py $(DEMO_ARGS)
