#!/usr/bin/env bash
# Creates .venv and installs every hoosh package (editable) with its dependencies,
# exactly the versions (and files) of requirements/dev.txt.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip's own status, without the warnings about absent local package indexes.
pip_install() { "${PIP[@]}" install -q "$@" 2> >(grep -v 'is ignored' >&2); }

# Every third-party package comes from a lock (requirements/*.txt, `make lock`), each
# file checked against its sha256. The installer and the build backends first, so
# that the sdist below and the hoosh packages build with these, nothing unpinned.
pip_install --require-hashes --no-deps -r requirements/build.txt

# llama.cpp's default build uses every instruction the CPU advertises; some VMs
# advertise AMX and then refuse it (SIGILL). A portable build avoids that. pip
# caches the built wheel, so only the first install compiles (~7 min on 2 cores).
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python (portable CPU build; first time only, several minutes)..."
fi
CMAKE_ARGS="-DGGML_NATIVE=OFF" FORCE_CMAKE=1 \
  pip_install --require-hashes --no-deps --no-build-isolation -r requirements/dev.txt
"$VENV/bin/python" -c "import llama_cpp"

make --no-print-directory proto VENV="$VENV"

# The hoosh packages themselves, editable (their dependencies are all in the lock).
pip_install --no-deps --no-build-isolation \
  -e libs/common -e libs/metering -e libs/tenancy -e libs/cli \
  -e services/budget -e services/audit -e services/router \
  -e services/local-inference -e services/edge -e services/stt
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
