"""``python -m hoosh_stt``: serve /metrics, load the models, build the budget store and
the key limiter (in-process, on the budget's Redis) and the event publisher once, then
serve SttService until SIGTERM."""

# ruff: noqa: E402  (the imports below come after skip_aiohttp_for_nats)

from __future__ import annotations

from hoosh_common.lean_imports import skip_aiohttp_for_nats

skip_aiohttp_for_nats()  # before anything imports nats: see hoosh_common.lean_imports

import logging
import sys

import nats
from hoosh_common.eventbus import nats_inbox_prefix
from hoosh_common.grpc_server import configure_plane, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.prices import AudioPrice, usd_to_micros
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from hoosh_metering.errors import BudgetError
from hoosh_metering.limits import KeyLimiter
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import connect_redis
from pydantic import ValidationError
from redis.exceptions import RedisError

from .budget import SttBudget
from .config import ModelSpec, SttSettings, model_specs
from .engine import Engine
from .errors import EngineUnavailable
from .server import SERVICE_NAME, SttServicer, add_to_server
from .transcription import TranscriptionService, WorkQueue

log = logging.getLogger("hoosh_stt")


def cuda_devices() -> int:
    """CUDA devices CTranslate2 can use (0 without a GPU or a CUDA build)."""
    import ctranslate2

    try:
        return int(ctranslate2.get_cuda_device_count())
    except RuntimeError:
        return 0


def build_engine(settings: SttSettings, specs: list[ModelSpec]) -> Engine:
    """whisperx on a GPU when it is installed (or asked for), faster-whisper otherwise."""
    import importlib.util

    device = settings.stt_device
    if device == "auto":
        device = "cuda" if cuda_devices() > 0 else "cpu"
    compute_type = settings.stt_compute_type or ("float16" if device == "cuda" else "int8")
    name = settings.stt_engine
    if name == "auto":
        name = "whisperx" if device == "cuda" and importlib.util.find_spec("whisperx") else "faster-whisper"
    if name == "whisperx":
        from .whisperx_engine import WhisperXEngine

        return WhisperXEngine(
            specs,
            device=device,
            compute_type=compute_type,
            batch_size=settings.stt_batch_size,
            beam_size=settings.stt_beam_size,
            cpu_threads=settings.stt_cpu_threads,
            align_model_dir=settings.stt_align_model_dir,
            vad_filter=settings.stt_vad_filter,
        )
    from .faster_whisper_engine import FasterWhisperEngine

    return FasterWhisperEngine(
        specs,
        device=device,
        compute_type=compute_type,
        cpu_threads=settings.stt_cpu_threads,
        workers=settings.stt_workers,
        beam_size=settings.stt_beam_size,
        vad_filter=settings.stt_vad_filter,
    )


async def main(settings: SttSettings, engine: Engine) -> None:
    nc = await nats.connect(
        settings.nats_url,
        name="hoosh-stt",
        max_reconnect_attempts=-1,
        inbox_prefix=nats_inbox_prefix(settings.nats_url),
    )
    js = nc.jetstream()
    await settings.declare_stream(js, settings.nats_stream, settings.subject_prefix)
    publisher = settings.event_publisher(nc, js, settings.nats_stream, settings.subject_prefix, "stt")
    await publisher.start()  # drains what an earlier process left in the outbox
    redis = connect_redis(settings.redis_url)
    store = BudgetStore(
        redis, settings.budget_key_prefix, settings.stt_lease_seconds, expiry_policy=settings.budget_expiry_policy
    )
    await store.start()
    budget = SttBudget(store, settings.stt_lease_seconds)
    service = TranscriptionService(
        engine,
        budget,
        publisher,
        WorkQueue(settings.stt_workers, settings.stt_max_queue, settings.stt_retry_after_seconds),
        tokens_per_second=settings.stt_tokens_per_second,
        max_audio_bytes=settings.stt_max_audio_bytes,
        max_audio_seconds=settings.stt_max_audio_seconds,
        window_seconds=settings.stt_window_seconds,
        decode_workers=settings.stt_decode_workers,
        price=AudioPrice(per_minute=usd_to_micros(settings.stt_price_per_minute_usd)),
        # The callers' own RPM / TPM / concurrency, in the same Redis as the router's.
        limiter=KeyLimiter(redis, settings.budget_key_prefix),
    )
    server = new_server()
    add_to_server(SttServicer(service), server)

    async def on_stop() -> None:
        await service.drain_key_limits()
        await publisher.close(grace=5.0)  # no event is lost: what NATS does not take stays in the outbox
        await nc.drain()
        await budget.close()
        await store.close()
        await redis.aclose()
        service.close()
        engine.close()

    log.info(
        "stt starting",
        extra={
            "engine": engine.name,
            "models": [model.id for model in engine.models()],
            "workers": settings.stt_workers,
            "max_queue": settings.stt_max_queue,
            "max_audio_seconds": settings.stt_max_audio_seconds,
            "window_seconds": settings.stt_window_seconds,
            "vad_filter": settings.stt_vad_filter,
        },
    )
    await serve(server, settings.stt_listen, [SERVICE_NAME], on_stop=on_stop, ready=lambda: publisher.healthy)


def cli() -> None:
    """Read settings and load the models (fail fast, before binding), then serve."""
    configure_logging("stt")
    try:
        settings = SttSettings()
    except ValidationError as exc:
        sys.exit(f"hoosh-stt: bad settings: {exc}")
    configure_tracing("stt")  # before the gRPC server is built: new_server() reads it
    configure_plane(settings.internal_plane("stt", callers=["edge"]))
    try:
        # Bound before the models load: a taken port fails at once.
        serve_metrics(settings.stt_metrics_listen)
    except (OSError, ValueError) as exc:
        sys.exit(
            f"hoosh-stt: cannot serve metrics on {settings.stt_metrics_listen!r} (HOOSH_STT_METRICS_LISTEN): {exc}"
        )
    try:
        specs = model_specs(settings)
        engine = build_engine(settings, specs)
        engine.load()
    except (FileNotFoundError, EngineUnavailable) as exc:
        sys.exit(f"hoosh-stt: {exc}")
    try:
        run(main(settings, engine))
    except (BudgetError, RedisError) as exc:  # start-up only: calls handle their own errors
        sys.exit(f"hoosh-stt: cannot use the budget's Redis (HOOSH_REDIS_URL): {exc}")


if __name__ == "__main__":
    cli()
