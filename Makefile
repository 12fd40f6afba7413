# Everyday targets. `make up` and `make test` are the README's two commands.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := libs/common/src

.PHONY: install proto proto-types up test test-fast lint typecheck fmt bench clean lock

$(VENV)/.installed: scripts/install.sh requirements/build.txt requirements/dev.txt $(wildcard services/*/pyproject.toml libs/*/pyproject.toml)
	bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

proto:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) $$(find protos -name '*.proto' | sort)
	find $(PROTO_OUT)/hoosh -type d -exec touch {}/__init__.py \;

# Typed stubs (.pyi) for the generated gRPC modules (mypy-protobuf): the stubs, the
# servicer base classes and add_*_to_server as `make typecheck` checks their callers.
# Nothing runs them, so the images' protoc line leaves them out.
proto-types: proto
	$(PY) -m grpc_tools.protoc -Iprotos --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --mypy_grpc_out=quiet:$(PROTO_OUT) $$(find protos -name '*.proto' | sort)

up: install proto
	$(VENV)/bin/hoosh up

# The whole suite: tests/ and the libraries' and services' tests in two pytest processes
# at once (scripts/test.sh); PYTEST_ARGS (a file, -k ...) runs one plain pytest. pytest's
# exit 5 (no tests collected) is a failure, not a pass.
test: install proto
	@PY=$(VENV)/bin/python bash scripts/test.sh $(PYTEST_ARGS)

test-fast: proto
	$(VENV)/bin/python -m pytest -m "not slow"

# The vLLM engine checked against real vLLM on the CPU (opt-in, never part of `make
# test`): its own venv (.venv-vllm from requirements/vllm-cpu-test.txt, vLLM at the GPU
# image's pin with its CUDA torch, about 10 GB; Python 3.12 as in vLLM's image) and
# services/local-inference/tests_vllm, where vLLM's engine runs with only its GPU engine
# core replaced by a stub, on tiny models the tests make (nothing is downloaded).
.PHONY: test-vllm
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $(p))))

$(VLLM_VENV)/.installed: requirements/vllm-cpu-test.txt
	@test -n "$(VLLM_PYTHON)" || { echo "make test-vllm needs Python 3.12 (set VLLM_PYTHON)" >&2; exit 1; }
	rm -rf $(VLLM_VENV)
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --no-deps --require-hashes -r requirements/vllm-cpu-test.txt
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(MAKE) --no-print-directory proto PY=$(VLLM_VENV)/bin/python
	@VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 PYTHONPATH=libs/common/src:services/local-inference/src \
	  $(VLLM_VENV)/bin/python -m pytest services/local-inference/tests_vllm $(PYTEST_ARGS); code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy --strict over every hoosh package (configuration in pyproject.toml).
typecheck: proto-types
	$(VENV)/bin/python -m mypy $(foreach p,hoosh_common hoosh_metering hoosh_tenancy hoosh_cli hoosh_edge hoosh_router hoosh_budget hoosh_audit hoosh_stt hoosh_inference,-p $(p))

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install proto
	$(VENV)/bin/python -m bench

# The lock files (requirements/*.txt, every file's sha256) from requirements/*.in and
# the pyproject.toml files they name: scripts/install.sh and every Dockerfile install
# from them with --require-hashes. Needs PyPI. Pins already in a lock are kept unless
# a pyproject or .in asks otherwise; `make lock UPGRADE=1` moves everything to the
# newest allowed. Then pip-audit checks every lock against PyPI's advisories.
UV ?= $(VENV)/bin/uv
LOCK_ARGS := pip compile --quiet --generate-hashes --python-platform linux \
	--index-url https://pypi.org/simple --custom-compile-command "make lock" \
	--override requirements/overrides.in $(if $(UPGRADE),--upgrade) \
	$(foreach p,cli common metering tenancy audit budget edge local-inference router stt,--no-emit-package hoosh-$(p))
# Advisories with no fixed release, accepted (tests/test_supply_chain.py, ACCEPTED):
# diskcache's CVE-2025-69872 (unpickling its cache directory; only llama-cpp-python's
# LlamaDiskCache uses it, which hoosh never creates).
AUDIT_IGNORE := --ignore-vuln GHSA-w8v5-vhqr-4h9v --ignore-vuln PYSEC-2026-2447
# Python 3.11 as the python:3.11 images; vLLM's image has Python 3.12.
LOCKS_311 := dev edge router budget audit stt local-inference stt-gpu

lock:
	$(UV) $(LOCK_ARGS) --python-version 3.11 requirements/build.in -o requirements/build.txt
	set -e; for l in $(LOCKS_311); do \
	  $(UV) $(LOCK_ARGS) --python-version 3.11 requirements/$$l.in -o requirements/$$l.txt; done
	$(UV) $(LOCK_ARGS) --python-version 3.12 --override requirements/local-inference-gpu.overrides.in \
	  requirements/vllm.in -o requirements/vllm.txt
	$(UV) $(LOCK_ARGS) --python-version 3.12 --override requirements/local-inference-gpu.overrides.in \
	  --constraint requirements/vllm.txt requirements/local-inference-gpu.in -o requirements/local-inference-gpu.txt
	$(UV) $(LOCK_ARGS) --python-version 3.12 --override requirements/local-inference-gpu.overrides.in \
	  --constraint requirements/vllm.txt requirements/vllm-cpu-test.in -o requirements/vllm-cpu-test.txt
	set -e; for l in build $(LOCKS_311) vllm local-inference-gpu vllm-cpu-test; do echo "pip-audit requirements/$$l.txt"; \
	  $(VENV)/bin/pip-audit --no-deps --disable-pip --progress-spinner off -s pypi $(AUDIT_IGNORE) -r requirements/$$l.txt; done

clean:
	rm -rf $(VENV) $(PROTO_OUT)/hoosh .hoosh
