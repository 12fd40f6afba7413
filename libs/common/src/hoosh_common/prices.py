"""The price table: what a call costs, in integer micro-dollars (never floats).

Prices ship as data (``prices.json`` beside this module: list prices in USD as
decimal strings, by provider type and model id) and are converted once, exactly, to
integer micro-dollars per million tokens (chat, embeddings) or per minute (audio).
Configuration overrides them per provider and model (the router's and stt's
``pricing`` settings); a model the table does not list costs 0 until configured.

Rounding: each side of a call (uncached input, cached input, output, audio) is
rounded up to the next micro-dollar, the same rule the budget's Lua applies to
reservations, so a commit never charges less than its parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import cache
from importlib import resources
from typing import Any, Literal

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # chat and embedding prices are per million tokens
MS_PER_MINUTE = 60_000

Catalogue = Literal["chat", "embeddings", "audio"]


def usd_to_micros(value: str | int | float | Decimal) -> int:
    """USD (a decimal string preferably: ``"0.075"``) as integer micro-dollars, exact to
    the micro-dollar (finer fractions round half up). Raises ValueError when it is not a
    non-negative number."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation as error:
        raise ValueError(f"not a price in USD: {value!r}") from error
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"a price must be a non-negative number of USD (got {value!r})")
    return int((amount * MICROS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def micros_to_usd(micros: int) -> str:
    """Integer micro-dollars as an exact decimal string of USD (``140`` -> ``"0.000140"``)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def cost_of(units: int, micros_per_million: int) -> int:
    """ceil(units * price / 1e6): the cost of ``units`` tokens at a per-million price."""
    if units <= 0 or micros_per_million <= 0:
        return 0
    return -(-units * micros_per_million // TOKENS_PER_PRICE_UNIT)


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Micro-dollars per million tokens. ``cached_input`` applies to the prompt tokens the
    provider served from its prompt cache (a part of the prompt tokens)."""

    input: int = 0
    cached_input: int = 0
    output: int = 0

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """The call's cost in micro-dollars; ``cached_tokens`` is clamped to the prompt."""
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        return (
            cost_of(prompt_tokens - cached, self.input)
            + cost_of(cached, self.cached_input)
            + cost_of(completion_tokens, self.output)
        )

    @property
    def free(self) -> bool:
        return not (self.input or self.cached_input or self.output)


@dataclass(frozen=True, slots=True)
class AudioPrice:
    """Micro-dollars per minute of audio."""

    per_minute: int = 0

    def cost(self, duration_ms: int) -> int:
        """ceil(duration * price): the cost of ``duration_ms`` of audio in micro-dollars."""
        if duration_ms <= 0 or self.per_minute <= 0:
            return 0
        return -(-duration_ms * self.per_minute // MS_PER_MINUTE)


FREE = TokenPrice()
FREE_AUDIO = AudioPrice()


def token_price(entry: dict[str, Any]) -> TokenPrice:
    """A table entry (``{"input": "0.15", "cached_input": ..., "output": ...}``, USD per
    million tokens) as micro-dollars; a missing cached price is the input price."""
    input_micros = usd_to_micros(entry.get("input", 0))
    cached = entry.get("cached_input")
    return TokenPrice(
        input=input_micros,
        cached_input=input_micros if cached is None else usd_to_micros(cached),
        output=usd_to_micros(entry.get("output", 0)),
    )


def audio_price(entry: dict[str, Any]) -> AudioPrice:
    return AudioPrice(per_minute=usd_to_micros(entry.get("per_minute", 0)))


def _lookup(models: dict[str, Any], model: str) -> Any | None:
    """The entry for ``model``: exact first, then the longest ``prefix*`` entry."""
    entry = models.get(model)
    if entry is not None:
        return entry
    best: tuple[int, Any] | None = None
    for pattern, candidate in models.items():
        if pattern.endswith("*") and model.startswith(pattern[:-1]):
            if best is None or len(pattern) > best[0]:
                best = (len(pattern), candidate)
    return best[1] if best else None


class PriceTable:
    """The shipped list prices (or ``data`` of the same shape), looked up by provider type
    and model id. Lookups are memoised: a request costs a dictionary hit."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        raw = data if data is not None else _bundled()
        self._chat = {kind: {m: token_price(e) for m, e in models.items()} for kind, models in raw["chat"].items()}
        self._embeddings = {
            kind: {m: token_price(e) for m, e in models.items()} for kind, models in raw.get("embeddings", {}).items()
        }
        self._audio = {
            kind: {m: audio_price(e) for m, e in models.items()} for kind, models in raw.get("audio", {}).items()
        }
        self._memo: dict[tuple[str, str, str], TokenPrice | AudioPrice | None] = {}

    def chat(self, provider_type: str, model: str) -> TokenPrice | None:
        """The list price of a chat model, or None when the table does not know it."""
        found = self._find("chat", self._chat, provider_type, model)
        return found if isinstance(found, TokenPrice) else None

    def embeddings(self, provider_type: str, model: str) -> TokenPrice | None:
        found = self._find("embeddings", self._embeddings, provider_type, model)
        return found if isinstance(found, TokenPrice) else None

    def audio(self, provider_type: str, model: str) -> AudioPrice | None:
        found = self._find("audio", self._audio, provider_type, model)
        return found if isinstance(found, AudioPrice) else None

    def _find(
        self, catalogue: str, table: dict[str, dict[str, Any]], provider_type: str, model: str
    ) -> TokenPrice | AudioPrice | None:
        key = (catalogue, provider_type, model)
        if key in self._memo:
            return self._memo[key]
        found = _lookup(table.get(provider_type, {}), model)
        if len(self._memo) < 4096:  # bounded: ids come from configuration and requests
            self._memo[key] = found
        return found


@cache
def _bundled() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resources.files(__package__).joinpath("prices.json").read_text())
    return data


@cache
def default_table() -> PriceTable:
    """The shipped table (built once per process)."""
    return PriceTable()
