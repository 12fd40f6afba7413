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
the responses it still runs ``failed``. The look is a renewal of the run's lease (a small
key, ``EXPIRE``; responses_store.py): a cancel or a delete removes the lease, so a failed
renewal is the signal to stop. An edge that dies without a shutdown stops renewing: once
the lease (``HOOSH_RESPONSES_BACKGROUND_LEASE_SECONDS``) lapses, the next read of the
response (GET, cancel) marks it ``failed``.

Each edge runs at most ``HOOSH_RESPONSES_MAX_BACKGROUND`` background responses, and at
most ``HOOSH_RESPONSES_MAX_BACKGROUND_PER_KEY`` for one key (more: 429, nothing stored).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    to_api_error,
)
from .responses_store import ResponsesStore, StoredResponse

log = logging.getLogger(__name__)

ACTIVE = ("queued", "in_progress")
TERMINAL = ("completed", "incomplete", "failed", "cancelled")
SHUTDOWN_MESSAGE = "The gateway shut down before the response completed; create it again."
ORPHAN_MESSAGE = "The gateway replica running this response stopped before it completed; create it again."
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
    owner: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    shutdown: bool = False
    task: asyncio.Task[None] | None = None


class BackgroundResponses:
    """The background responses this edge runs, and cancel for any edge's."""

    def __init__(
        self,
        store: ResponsesStore,
        poll_seconds: float,
        *,
        lease_seconds: float = 30.0,
        max_running: int = 256,
        max_per_owner: int = 16,
    ) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        # A lease outlives several missed renewals (a slow Redis moment does not orphan a run).
        self._lease_seconds = max(lease_seconds, 3 * poll_seconds)
        self._max_running = max_running
        self._max_per_owner = max_per_owner
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
        failed response object from an error. 429 over this edge's bounds."""
        if len(self._runs) >= self._max_running:
            raise RateLimitError(
                f"This gateway replica already runs {self._max_running} background responses; "
                "try again once some have finished.",
                param="background",
                code="too_many_background_responses",
                headers={"Retry-After": "1"},
            )
        if sum(1 for run in self._runs.values() if run.owner == queued.owner) >= self._max_per_owner:
            raise RateLimitError(
                f"This API key already runs {self._max_per_owner} background responses on this gateway replica; "
                "wait for one to finish or cancel one.",
                param="background",
                code="too_many_background_responses",
                headers={"Retry-After": "1"},
            )
        run = _Run(str(queued.response["id"]), queued.owner)
        self._runs[run.response_id] = run  # counted before the write: concurrent creates see it
        try:
            await self._store.save_running(queued, self._lease_seconds)
        except BaseException:
            self._runs.pop(run.response_id, None)
            raise
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

        try:
            await self._run_and_settle(run, start, record, failed, receive, save, lambda: finished)
        finally:
            self._runs.pop(run.response_id, None)
            await self._store.end_run(run.response_id)

    async def _run_and_settle(
        self,
        run: _Run,
        start: Start,
        record: Callable[[dict[str, Any]], StoredResponse],
        failed: Callable[[dict[str, str]], dict[str, Any]],
        receive: Receive,
        save: Save,
        finished: Callable[[], bool],
    ) -> None:
        watcher = asyncio.create_task(self._watch(run))
        failure: dict[str, str] | None = None
        try:
            try:
                begun = await self._store.replace(run.response_id, _in_progress)
            except Exception:
                begun = None
                failure = {"code": "server_error", "message": "The response store was unavailable."}
            if begun is None:
                if failure is None:
                    return  # cancelled or deleted before it started: nothing to run
                raise _NotStarted
            stream = await start(receive, save)
            if hasattr(stream, "__aiter__"):
                try:
                    async for chunk in stream:
                        if chunk.startswith(_FAILED_EVENT):
                            event = orjson.loads(chunk.split(b"\ndata: ", 1)[1])
                            failure = event["response"].get("error") or failure
                finally:
                    await stream.aclose()
        except _NotStarted:
            pass
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
        if run.shutdown:
            failure = {"code": "server_error", "message": SHUTDOWN_MESSAGE}
        elif run.stop.is_set() or finished():
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
        """Renew the run's lease; stop the run once the lease is gone (a cancel or a
        delete on any edge removes it; so does a lapse, after which a read marks it failed)."""
        while not run.stop.is_set():
            await asyncio.sleep(self._poll_seconds)
            try:
                alive = await self._store.renew_run(run.response_id, self._lease_seconds)
            except Exception:
                continue  # Redis unavailable for a moment: try again (the lease outlives a few)
            if not alive:
                run.stop.set()

    async def settle_orphan(self, stored: StoredResponse) -> StoredResponse:
        """``stored`` as it really is: an active background response whose lease has lapsed
        (its edge died without a shutdown) is marked failed, by compare-and-set."""
        if stored.status not in ACTIVE or stored.response.get("background") is not True:
            return stored
        response_id = str(stored.response["id"])
        if response_id in self._runs:
            return stored
        try:
            if await self._store.run_alive(response_id):
                return stored
        except ServiceUnavailableError:
            return stored  # Redis away for a moment: answer it as stored, decide on a later read

        def orphaned(current: StoredResponse) -> StoredResponse | None:
            if current.status not in ACTIVE:
                return None
            response = {
                **current.response,
                "status": "failed",
                "error": {"code": "server_error", "message": ORPHAN_MESSAGE},
            }
            return StoredResponse(current.owner, response, current.input_items, current.conversation)

        written = await self._store.replace(response_id, orphaned)
        if written is not None:
            log.warning("background response orphaned by a stopped edge", extra={"response_id": response_id})
            return written
        return await self._store.peek(response_id) or stored

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
        await self._store.end_run(response_id)  # the running edge stops at its next renewal
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


class _NotStarted(Exception):
    """The run could not be marked in progress (the store failed): it fails without a call."""


def _in_progress(current: StoredResponse) -> StoredResponse | None:
    if current.status != "queued":
        return None
    return StoredResponse(
        current.owner, {**current.response, "status": "in_progress"}, current.input_items, current.conversation
    )
