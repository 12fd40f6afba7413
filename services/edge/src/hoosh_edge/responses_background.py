"""Background responses (``POST /v1/responses`` with ``background: true``).

The request is checked and translated as any other, stored ``queued`` and answered at
once; the edge that received it then runs it as a task (through the router's streaming
path, so a cancel stops the upstream call mid-answer), moving the stored response to
``in_progress`` and to ``completed`` / ``incomplete`` / ``failed`` (with its ``error``).
Any replica reads its progress (GET), since the state is in Redis only.

``POST /v1/responses/{id}/cancel`` may reach any edge: it sets the stored status to
``cancelled`` by compare-and-set (the first of a finish and a cancel wins). The running
edge stops its task when it sees that: at once when the cancel came to it, otherwise at
its next look at the stored response (every ``HOOSH_RESPONSES_BACKGROUND_POLL_SECONDS``),
which also stops a response its owner deleted. A stopped call is settled by the router
as a client that went away (what was generated is charged). At shutdown the edge marks
the responses it still runs ``failed``; an edge that dies without a shutdown leaves its
responses ``in_progress`` until they expire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import APIError, InvalidRequestError, NotFoundError, to_api_error
from .responses_store import ResponsesStore, StoredResponse

log = logging.getLogger(__name__)

ACTIVE = ("queued", "in_progress")
TERMINAL = ("completed", "incomplete", "failed", "cancelled")
SHUTDOWN_MESSAGE = "The gateway shut down before the response completed; create it again."
_FAILED_EVENT = b"event: response.failed\n"
_ERROR_CODES = {429: "rate_limit_exceeded", 400: "invalid_prompt"}

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Save = Callable[[dict[str, Any]], Awaitable[None]]
# Starts the response on the router's streaming path: a stream of SSE events to drain
# (or, from a path that answers at once, anything else: already saved through ``save``).
Start = Callable[[Receive, Save], Awaitable[Any]]


def error_of(error: APIError) -> dict[str, str]:
    """An API error as a response's ``error`` (OpenAI's ResponseError codes)."""
    return {"code": _ERROR_CODES.get(error.status, "server_error"), "message": error.message}


@dataclass(slots=True)
class _Run:
    response_id: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    shutdown: bool = False
    task: asyncio.Task[None] | None = None


class BackgroundResponses:
    """The background responses this edge runs, and cancel for any edge's."""

    def __init__(self, store: ResponsesStore, poll_seconds: float) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self._runs: dict[str, _Run] = {}

    @property
    def running(self) -> int:
        return len(self._runs)

    async def start(
        self,
        queued: StoredResponse,
        start: Start,
        record: Callable[[dict[str, Any]], StoredResponse],
        failed: Callable[[dict[str, str]], dict[str, Any]],
    ) -> dict[str, Any]:
        """Store ``queued`` and run ``start`` in the background; the queued response.
        ``record`` makes the stored record of a final response object, ``failed`` a
        failed response object from an error."""
        await self._store.save(queued)
        run = _Run(str(queued.response["id"]))
        self._runs[run.response_id] = run
        run.task = asyncio.create_task(self._run(run, start, record, failed), name=f"response {run.response_id}")
        return queued.response

    async def _finish(self, response_id: str, stored: StoredResponse) -> bool:
        """Write a final response unless the stored one is no longer active (cancelled,
        deleted): the first of a finish and a cancel wins."""
        written = await self._store.replace(response_id, lambda current: stored if current.status in ACTIVE else None)
        return written is not None

    async def _run(
        self,
        run: _Run,
        start: Start,
        record: Callable[[dict[str, Any]], StoredResponse],
        failed: Callable[[dict[str, str]], dict[str, Any]],
    ) -> None:
        async def receive() -> MutableMapping[str, Any]:
            await run.stop.wait()  # a cancel (or shutdown) is this run's "client going away"
            return {"type": "http.disconnect"}

        finished = False

        async def save(response: dict[str, Any]) -> None:
            nonlocal finished
            response["background"] = True
            finished = True
            await self._finish(run.response_id, record(response))

        watcher = asyncio.create_task(self._watch(run))
        failure: dict[str, str] | None = None
        try:
            await self._store.replace(run.response_id, _in_progress)
            stream = await start(receive, save)
            if hasattr(stream, "__aiter__"):
                try:
                    async for chunk in stream:
                        if chunk.startswith(_FAILED_EVENT):
                            event = orjson.loads(chunk.split(b"\ndata: ", 1)[1])
                            failure = event["response"].get("error") or failure
                finally:
                    await stream.aclose()
        except asyncio.CancelledError:
            if not run.stop.is_set():
                raise
        except Exception as exc:
            if not run.stop.is_set():
                error = to_api_error(exc)
                if error.status >= 500:
                    log.warning("background response failed", extra={"response_id": run.response_id})
                failure = error_of(error)
        finally:
            watcher.cancel()
            self._runs.pop(run.response_id, None)
        if run.shutdown:
            failure = {"code": "server_error", "message": SHUTDOWN_MESSAGE}
        elif run.stop.is_set() or finished:
            return  # cancelled (or deleted) elsewhere, or finished (failed included) and stored
        if failure is None:
            failure = {"code": "server_error", "message": "The response ended before it was complete."}
        try:
            response = failed(failure)
            response["background"] = True
            await self._finish(run.response_id, record(response))
        except Exception:
            log.exception("could not store a failed background response", extra={"response_id": run.response_id})

    async def _watch(self, run: _Run) -> None:
        """Stop the run once its stored response is cancelled or gone (any edge's doing)."""
        while not run.stop.is_set():
            await asyncio.sleep(self._poll_seconds)
            try:
                stored = await self._store.peek(run.response_id)
            except Exception:
                continue  # Redis unavailable for a moment: look again later
            if stored is None or stored.status == "cancelled":
                run.stop.set()

    async def cancel(self, stored: StoredResponse) -> dict[str, Any]:
        """Cancel an owner's background response (``stored``, already checked to be the
        owner's): cancelled now if still queued or in progress; a cancelled one answers as
        it is; a finished one, or one not run in the background, is a 400."""
        response_id = str(stored.response["id"])
        if stored.response.get("background") is not True:
            raise InvalidRequestError(
                "Only responses created with background set to true can be cancelled.",
                param="response_id",
                code="invalid_value",
            )

        def cancelled(current: StoredResponse) -> StoredResponse | None:
            if current.status not in ACTIVE:
                return None
            response = {**current.response, "status": "cancelled", "completed_at": None, "output": []}
            response.pop("usage", None)
            return StoredResponse(current.owner, response, current.input_items, current.conversation)

        written = await self._store.replace(response_id, cancelled)
        if written is None:
            current = await self._store.peek(response_id)
            if current is None or current.owner != stored.owner:
                raise NotFoundError(
                    f"Response with id '{response_id}' not found.", param="response_id", code="response_not_found"
                )
            if current.status != "cancelled":
                raise InvalidRequestError(
                    f"Cannot cancel a response with status '{current.status}'.",
                    param="response_id",
                    code="invalid_value",
                )
            return current.response
        run = self._runs.get(response_id)
        if run is not None:  # running here: stop it now rather than at the next look
            run.stop.set()
        return written.response

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Shutdown: stop every run of this edge and mark its response failed."""
        runs = list(self._runs.values())
        for run in runs:
            run.shutdown = True
            run.stop.set()
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)


def _in_progress(current: StoredResponse) -> StoredResponse | None:
    if current.status != "queued":
        return None
    return StoredResponse(
        current.owner, {**current.response, "status": "in_progress"}, current.input_items, current.conversation
    )
