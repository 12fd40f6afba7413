#!/usr/bin/env bash
# Creates .venv and installs every hoosh package (editable) with its dependencies.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel 2>&1 | grep -v 'is ignored' || true

# llama.cpp's default build uses every instruction the CPU advertises; some VMs
# advertise AMX and then refuse it (SIGILL). A portable build avoids that. pip
# caches the built wheel, so only the first install compiles (~7 min on 2 cores).
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python (portable CPU build; first time only, several minutes)..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF" FORCE_CMAKE=1 "${PIP[@]}" install -q "llama-cpp-python==0.3.36" 2>&1 | grep -v 'is ignored' || true
  "$VENV/bin/python" -c "import llama_cpp" 
fi

"${PIP[@]}" install -q grpcio-tools==1.85.1 2>&1 | grep -v 'is ignored' || true
make --no-print-directory proto VENV="$VENV"

"${PIP[@]}" install -q -r requirements-dev.txt \
  -e libs/common -e libs/metering -e libs/tenancy -e libs/cli \
  -e services/budget -e services/audit -e services/router \
  -e services/local-inference -e services/edge -e services/stt 2>&1 | grep -v 'is ignored' || true
"$VENV/bin/python" -c "import hoosh_common, hoosh_metering, hoosh_tenancy, hoosh_cli, hoosh_budget, hoosh_audit, hoosh_router, hoosh_inference, hoosh_edge, hoosh_stt, faster_whisper, llama_cpp"

# The speech tests render their audio with espeak-ng (a Debian package, not a PyPI one).
# Installed only when missing, and only where we may (root with apt).
if ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing espeak-ng (test speech)..."
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
  else
    echo "warning: espeak-ng is missing and cannot be installed here; the speech tests need it (apt-get install espeak-ng)" >&2
  fi
fi
echo "hoosh installed in $VENV"
