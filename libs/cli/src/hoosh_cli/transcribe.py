"""``hoosh transcribe FILE``: speech to text (POST /v1/audio/transcriptions), with a
progress bar while the file uploads and a spinner while the server decodes and
transcribes it (on stderr, on a terminal); the text goes to stdout."""

from __future__ import annotations

import argparse
import mimetypes
import os
from pathlib import Path
from typing import IO, Any, cast

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from . import output
from .client import Context, decode, error_from
from .errors import UsageError
from .parser import command, finite
from .terminal import clean

DEFAULT_STT_MODEL = "whisper-tiny.en"  # the local model `hoosh up` serves
TRANSCRIBE_TIMEOUT = 600.0  # a long recording takes a while to decode
FORMATS = ("json", "verbose_json", "text", "srt", "vtt")


class UploadProgress:
    """A binary file whose reads advance the upload bar; its end starts the decoding
    spinner (httpx reads a multipart file as it sends it)."""

    def __init__(self, handle: IO[bytes], progress: Progress, upload: TaskID, on_end: Any) -> None:
        self.handle = handle
        self.progress = progress
        self.upload = upload
        self.on_end = on_end
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        self.progress.advance(self.upload, len(chunk))
        if not chunk and not self.ended:
            self.ended = True
            self.on_end()
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def fileno(self) -> int:
        return self.handle.fileno()


def transcribe(args: argparse.Namespace) -> int:
    ctx = Context.from_args(args, timeout=TRANSCRIBE_TIMEOUT)
    if ctx.json and args.format not in ("json", "verbose_json"):
        raise UsageError("--json needs --format json or verbose_json")
    path = Path(args.file)
    try:
        handle = path.open("rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    form = {"model": args.model or ctx.config.stt_model or DEFAULT_STT_MODEL, "response_format": args.format}
    for name in ("language", "prompt"):
        if getattr(args, name):
            form[name] = getattr(args, name)
    if args.temperature is not None:
        form["temperature"] = str(args.temperature)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=output.err_console(),
        transient=True,
    )
    with handle, progress, ctx.edge() as edge, edge.errors():
        upload = progress.add_task(f"uploading {clean(path.name)}", total=size)

        def decoding() -> None:
            progress.add_task("transcribing on the server", total=None)
            progress.refresh()

        progress.refresh()
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        reader = cast(IO[bytes], UploadProgress(handle, progress, upload, decoding))  # read, seek, tell, fileno
        files = {"file": (path.name, reader, mime)}
        response = edge.http.post("/v1/audio/transcriptions", data=form, files=files)
    if args.format in ("json", "verbose_json"):
        answer = decode(response)
        if ctx.json:
            output.emit_json(answer)
        else:
            said = answer.get("text") if isinstance(answer, dict) else None
            print(clean(str(said or ""), multiline=True).strip(), flush=True)
        return 0
    if response.status_code >= 400:
        raise error_from(response)
    shown = clean(response.text, multiline=True)
    print(shown, end="" if shown.endswith("\n") else "\n", flush=True)
    return 0


def add_commands(commands: Any) -> None:
    """``hoosh transcribe``."""
    listen = command(
        commands,
        "transcribe",
        transcribe,
        "speech to text: upload an audio file, print its text",
        description="POST /v1/audio/transcriptions with progress while uploading and while the server "
        "transcribes (on a terminal); the text goes to stdout.",
    )
    listen.add_argument("file", help="the audio file (wav, mp3, flac, ogg, m4a, webm, ...)")
    listen.add_argument(
        "-m", "--model", default=None, help=f"default: the config file's stt_model, {DEFAULT_STT_MODEL}"
    )
    listen.add_argument("--language", default=None, help="ISO-639-1 code of the speech (e.g. en)")
    listen.add_argument("--prompt", default=None, help="text to guide the style or spelling")
    listen.add_argument("--temperature", type=finite, default=None)
    listen.add_argument("--format", choices=FORMATS, default="json", help="what the server answers (default json)")
