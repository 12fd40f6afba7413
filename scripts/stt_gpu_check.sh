#!/usr/bin/env bash
# Run the whisperx engine on a GPU with the tests' sentence (see stt_gpu_check.py).
#
#   In the GPU image (whisperx installed; it has no espeak-ng, so render the sentence first):
#     espeak-ng -w speech.wav "the quick brown fox jumps over the lazy dog"
#     docker run --rm --gpus all -v "$PWD:/src" -w /src --entrypoint bash hoosh/stt-gpu:dev \
#       scripts/stt_gpu_check.sh --audio speech.wav
#   On a GPU host with `pip install -e 'services/stt[gpu]'` in the environment:
#     scripts/stt_gpu_check.sh
#
# Installs nothing from a network. Wheels placed in .whl/ (e.g. carried to a machine
# without a registry) are installed offline into /tmp/site first.
# Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYANNOTE_METRICS_ENABLED=0 HF_HUB_OFFLINE=1
# CTranslate2 dlopens cuBLAS/cuDNN: use the nvidia-* wheels next to torch when present.
NVIDIA_LIBS=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = [p for base in site.getsitepackages() + [os.environ.get("PYTHONPATH", "")] for p in glob.glob(os.path.join(base, "nvidia", "*", "lib"))]
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
exec "$PYTHON" scripts/stt_gpu_check.py "$@"
