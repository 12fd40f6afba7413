"""Where multipart uploads are spooled, and how many bytes one process holds at once.

Starlette spools each uploaded file in a ``SpooledTemporaryFile``: in memory up to
1 MB, then in the system's temporary directory, which may be a small tmpfs. The edge
reads its one upload route (/v1/audio/transcriptions) through
:func:`read_multipart`, which puts the spilled files in ``HOOSH_EDGE_UPLOAD_DIR`` and
admits an upload only while the bytes held by this process (each counted at its
declared Content-Length, or the route's body limit without one) stay within
``HOOSH_EDGE_UPLOAD_MAX_SPOOL_BYTES``: beyond, 503 ``upload_capacity`` with
Retry-After. A full disk while spooling is the same 503, not a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import SpooledTemporaryFile

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import InvalidRequestError, ServiceUnavailableError

log = logging.getLogger(__name__)

RETRY_AFTER = {"Retry-After": "1"}


class UploadCapacityError(ServiceUnavailableError):
    code = "upload_capacity"


class _SpoolingParser(MultiPartParser):
    """Starlette's multipart parser, with files spilling into ``directory``."""

    def __init__(self, headers: Headers, stream: AsyncIterator[bytes], *, directory: Path | None, **kw: int) -> None:
        super().__init__(headers, stream, **kw)  # type: ignore[arg-type]
        self.directory = directory

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        upload = self._current_part.file
        if upload is None or self.directory is None:
            return
        # The parser just made the part's (still empty) file in the default place.
        default = self._files_to_close_on_error.pop()
        default.close()
        spooled: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(
            max_size=self.spool_max_size, dir=str(self.directory)
        )
        self._files_to_close_on_error.append(spooled)
        upload.file = spooled  # type: ignore[assignment]


class UploadSpool:
    """The upload directory and the byte budget of one process (its event loop)."""

    def __init__(self, directory: Path | None, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.held = 0

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Count ``size`` bytes against the budget while the block runs; 503 when they do not fit."""
        if self.held + size > self.max_bytes:
            log.warning("upload refused: spool budget full", extra={"held": self.held, "size": size})
            raise UploadCapacityError(
                "The gateway is holding as many uploads as it can; retry shortly.", headers=RETRY_AFTER
            )
        self.held += size
        try:
            yield
        finally:
            self.held -= size

    async def read_multipart(self, request: Request, *, max_files: int, max_fields: int) -> FormData:
        """The request's form: multipart parsed with files spooled here; any other body by
        Starlette (a urlencoded form has no files). The caller closes the form."""
        content_type, _ = parse_options_header(request.headers.get("content-type"))
        if content_type != b"multipart/form-data":
            return await request.form(max_files=max_files, max_fields=max_fields)
        parser = _SpoolingParser(
            request.headers,
            request.stream(),
            directory=self.directory,
            max_files=max_files,
            max_fields=max_fields,
        )
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise InvalidRequestError(exc.message) from None
        except OSError as exc:  # the upload directory is full or gone
            log.warning("upload could not be spooled", extra={"error": repr(exc)})
            raise UploadCapacityError(
                "The gateway has no room to store the upload now; retry shortly.", headers=RETRY_AFTER
            ) from None
