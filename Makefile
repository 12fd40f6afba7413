# Everyday targets. `make up` and `make test` are the README's two commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := libs/common/src

.PHONY: install proto up test test-fast lint fmt bench clean

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

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install proto
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(PROTO_OUT)/hoosh .hoosh
