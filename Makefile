# Everyday targets. `make up` and `make test` are the README's two commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := libs/common/src

.PHONY: install proto up test test-fast lint typecheck fmt bench clean

$(VENV)/.installed: scripts/install.sh $(wildcard services/*/pyproject.toml libs/*/pyproject.toml)
	bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

proto:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) $$(find protos -name '*.proto' | sort)
	find $(PROTO_OUT)/hoosh -type d -exec touch {}/__init__.py \;

up: install proto
	$(VENV)/bin/hoosh up

# pytest's exit 5 (no tests collected) is a failure, not a pass.
test: install proto
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code

test-fast: proto
	$(VENV)/bin/python -m pytest -m "not slow"

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy --strict over every hoosh package (configuration in pyproject.toml).
typecheck:
	$(VENV)/bin/python -m mypy $(foreach p,hoosh_common hoosh_metering hoosh_tenancy hoosh_cli hoosh_edge hoosh_router hoosh_budget hoosh_audit hoosh_stt hoosh_inference,-p $(p))

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install proto
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(PROTO_OUT)/hoosh .hoosh
