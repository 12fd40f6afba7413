"""``hoosh hardware``: each hoosh host's GPUs, CPUs and memory (GET /v1/hardware);
``hoosh hardware placement``: the memory a model needs, the local GPUs it fits and
cloud alternatives (POST /v1/hardware/placement). Both with the admin key (they
disclose the hosts)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from . import output
from .client import Context
from .errors import ServerError
from .parser import common_options

QUANTIZATIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
HOST_COLUMNS = ("service", "instance", "cpus", "memory", "available", "gpus", "driver", "cuda", "where", "error")
GPU_COLUMNS = ("service", "instance", "gpu", "name", "used", "total", "free", "util %", "temp C", "power W")
FIT_COLUMNS = ("service", "instance", "gpu", "name", "free", "headroom")
CLOUD_COLUMNS = ("provider", "instance", "gpu", "count", "usd per hour")
_PARAMETERS = re.compile(r"(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parameters(text: str) -> float:
    """A parameter count: 7e9, 7000000000, 7B, 135M, 1.5b."""
    match = _PARAMETERS.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (7e9, 7B, 135M)")
    value = float(match.group(1)) * _SCALE[match.group(2).lower()]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is too large a parameter count")
    if value <= 0:
        raise argparse.ArgumentTypeError("a model has more than 0 parameters")
    return value


def count(value: float) -> str:
    """7e9 as 7B, 1.35e8 as 135M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _missing_route(exc: ServerError, route: str) -> ServerError:
    if exc.status in (404, 405) and exc.code in ("unknown_url", "method_not_allowed", None):
        return ServerError(f"this edge does not serve {route} ({exc})", status=exc.status, code=exc.code)
    return exc


def _where(host: dict[str, Any]) -> str:
    places = [name for name in ("container", "kubernetes") if host.get(name)]
    return ", ".join(places) if places else "host"


def print_hardware(answer: dict[str, Any]) -> None:
    hosts: list[dict[str, Any]] = answer.get("hosts", [])
    out = output.console()
    grid = output.table(f"{len(hosts)} hosts", *HOST_COLUMNS, right=("cpus", "memory", "available", "gpus"))
    gpus = output.table("GPUs", *GPU_COLUMNS, right=GPU_COLUMNS[4:])
    count = 0
    for host in hosts:
        grid.add_row(
            output.text(host.get("service")),
            output.text(host.get("instance")),
            output.text(host.get("cpu_count")),
            output.size(host.get("memory_total_bytes")),
            output.size(host.get("memory_available_bytes")),
            str(len(host.get("gpus") or [])),
            output.text(host.get("driver_version")),
            output.text(host.get("cuda_version")),
            _where(host),
            output.text(host["error"], style="red") if host.get("error") else "-",
        )
        for gpu in host.get("gpus") or []:
            count += 1
            gpus.add_row(
                output.text(host.get("service")),
                output.text(host.get("instance")),
                output.text(gpu.get("index")),
                output.text(gpu.get("name")),
                output.size(gpu.get("memory_used_bytes")),
                output.size(gpu.get("memory_total_bytes")),
                output.size(gpu.get("memory_free_bytes")),
                output.text(gpu.get("utilization_percent")),
                output.text(gpu.get("temperature_celsius")),
                output.number(gpu.get("power_watts"), 1) if gpu.get("power_watts") is not None else "-",
            )
    out.print(grid)
    if count:
        out.print(gpus)
    else:
        out.print("no GPU on any host: local models run on CPU")


def hardware(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    with ctx.edge(admin=True) as edge:
        try:
            answer = edge.get("/v1/hardware")
        except ServerError as exc:
            raise _missing_route(exc, "GET /v1/hardware") from None
    if ctx.json:
        output.emit_json(answer)
    else:
        print_hardware(answer)
    return 0


def placement_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "parameters": args.params,
        "quantization": args.quant,
        "context_length": args.context,
        "batch": args.batch,
    }
    for name in ("layers", "kv_heads", "head_dim"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


def print_placement(answer: dict[str, Any], body: dict[str, Any]) -> None:
    out = output.console()
    need = (
        f"{count(body['parameters'])} parameters at {body['quantization']}, context {body['context_length']}, "
        f"batch {body['batch']}: weights {output.size(answer.get('weights_bytes'))} + KV cache "
        f"{output.size(answer.get('kv_cache_bytes'))}"
    )
    if answer.get("overhead_bytes") is not None:
        need += f" + overhead {output.size(answer['overhead_bytes'])}"
    out.print(output.text(need + f" = {output.size(answer.get('total_bytes'))}"))
    shape = [f"{name} {answer[name]}" for name in ("layers", "kv_heads", "head_dim") if answer.get(name) is not None]
    if shape:
        source = f" (the shape of {answer['shape_model']})" if answer.get("shape_model") else ""
        out.print(output.text(", ".join(shape) + source))
    fits: list[dict[str, Any]] = answer.get("fits") or []
    if fits:
        grid = output.table("local GPUs it fits", *FIT_COLUMNS, right=("free", "headroom"))
        for fit in fits:
            grid.add_row(
                output.text(fit.get("service")),
                output.text(fit.get("instance")),
                output.text(fit.get("gpu_index", fit.get("index"))),
                output.text(fit.get("name")),
                output.size(fit.get("free_bytes")),
                output.size(fit.get("headroom_bytes")),
            )
        out.print(grid)
    else:
        out.print("it fits no local GPU")
    for host in answer.get("unanswered") or []:
        out.print(output.text(f"{host.get('service')} {host.get('instance')}: {host.get('error')}", style="yellow"))
    cloud: list[dict[str, Any]] = answer.get("cloud") or []
    if cloud:
        title = "cloud alternatives" + (
            f" (prices as of {answer['prices_as_of']})" if answer.get("prices_as_of") else ""
        )
        grid = output.table(title, *CLOUD_COLUMNS, right=("count", "usd per hour"))
        for offer in cloud:
            price = offer.get("hourly_usd")
            grid.add_row(
                output.text(offer.get("provider")),
                output.text(offer.get("instance")),
                output.text(offer.get("gpu")),
                output.text(offer.get("count")),
                f"{price:,.2f}" if isinstance(price, int | float) else output.text(price),
            )
        out.print(grid)


def placement(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args)
    body = placement_body(args)
    with ctx.edge(admin=True) as edge:
        try:
            answer = edge.post("/v1/hardware/placement", body=body)
        except ServerError as exc:
            raise _missing_route(exc, "POST /v1/hardware/placement") from None
    if ctx.json:
        output.emit_json(answer)
    else:
        print_placement(answer, body)
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh hardware [placement]``."""
    parser = commands.add_parser(
        "hardware",
        help="GPUs, CPUs and memory of each worker host; `hardware placement`: where a model fits",
        description="Each worker host's GPUs, CPUs and memory (GET /v1/hardware). "
        "`hoosh hardware placement --help`: the memory a model needs and where it fits.",
    )
    common_options(parser)
    parser.set_defaults(run=hardware)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    fit = actions.add_parser(
        "placement",
        help="memory a model needs (weights + KV cache), local GPUs it fits, cloud alternatives",
        description="POST /v1/hardware/placement: weights = parameters x bytes per parameter; KV cache = "
        "2 x layers x KV heads x head dim x context x batch x bytes.",
    )
    common_options(fit)
    fit.set_defaults(run=placement)
    fit.add_argument("--params", type=parameters, required=True, help="parameter count: 7e9, 7B, 135M")
    fit.add_argument("--quant", choices=QUANTIZATIONS, default="fp16", help="weights' precision (default fp16)")
    fit.add_argument("--context", type=positive, default=8192, help="context length in tokens (default 8192)")
    fit.add_argument("--batch", type=positive, default=1, help="sequences at once (default 1)")
    fit.add_argument("--layers", type=positive, default=None, help="transformer layers (default: the edge's guess)")
    fit.add_argument("--kv-heads", dest="kv_heads", type=positive, default=None, help="KV heads")
    fit.add_argument("--head-dim", dest="head_dim", type=positive, default=None, help="dimension per head")
