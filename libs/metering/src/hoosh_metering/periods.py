"""Calendar periods of a pool: when usage starts again at 0.

Boundaries are wall-clock boundaries in the pool's IANA time zone (``zoneinfo``),
so "daily" in Europe/Berlin starts at local midnight on both sides of a DST change
(those days are 23 and 25 hours long), and "weekly" starts on Monday 00:00. A
boundary that falls in a DST gap starts at the transition instant; one that is
ambiguous (a repeated hour) starts at its first occurrence.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidArgument

PERIODS: Final = ("none", "minute", "hourly", "daily", "weekly", "monthly")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# 1.5 nominal lengths past a boundary always lands inside the next period, whatever
# DST does to it (days are 23-25 h, months 28-31 days): its start is the next boundary.
_PAST_NEXT_MS: Final = {
    "minute": 90_000,
    "hourly": 90 * 60_000,
    "daily": 36 * 3_600_000,
    "weekly": 252 * 3_600_000,
    "monthly": int(46.5 * 86_400_000),
}


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as error:
        raise InvalidArgument(f"Unknown time zone '{timezone}'") from error


def validate_period(period: str, timezone: str) -> None:
    """Raise InvalidArgument unless ``period`` is one of PERIODS and ``timezone`` an IANA zone."""
    if period not in PERIODS:
        raise InvalidArgument(f"Unknown period '{period}'; expected one of {', '.join(PERIODS)}")
    _zone(timezone)


def _start(period: str, zone: ZoneInfo, now_ms: int) -> int:
    local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(zone)
    if period == "minute":
        start = local.replace(second=0, microsecond=0)  # keeps fold: a repeated minute is its own period
    elif period == "hourly":
        start = local.replace(minute=0, second=0, microsecond=0)
    else:
        start = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        if period == "weekly":
            start = (start - timedelta(days=start.weekday())).replace(fold=0)
        elif period == "monthly":
            start = start.replace(day=1)
    # Aware subtraction goes through UTC, honouring fold and resolving gaps forward.
    return (start - _EPOCH) // _MS


def period_start_ms(period: str, timezone: str, now_ms: int) -> int:
    """The start (ms since the epoch) of the period containing ``now_ms``; 0 for "none"."""
    return period_bounds_ms(period, timezone, now_ms)[0]


def period_bounds_ms(period: str, timezone: str, now_ms: int) -> tuple[int, int]:
    """``(start, end)`` in ms since the epoch of the period containing ``now_ms``.

    ``start <= now_ms < end``; ``(0, 0)`` for "none". Raises InvalidArgument for an
    unknown period or time zone.
    """
    if period == "none":
        return 0, 0
    if period not in PERIODS:
        raise InvalidArgument(f"Unknown period '{period}'; expected one of {', '.join(PERIODS)}")
    zone = _zone(timezone)
    start = _start(period, zone, now_ms)
    end = _start(period, zone, start + _PAST_NEXT_MS[period])
    return start, end


class PeriodClock:
    """Period bounds with a cache: a request in the same period costs a dict look-up.

    Not thread-safe by design; one per store, used from one event loop.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[int, int]] = {}

    def bounds(self, period: str, timezone: str, now_ms: int) -> tuple[int, int]:
        """As :func:`period_bounds_ms`, cached until the period ends."""
        if period == "none":
            return 0, 0
        key = (period, timezone)
        cached = self._cache.get(key)
        if cached is not None and cached[0] <= now_ms < cached[1]:
            return cached
        bounds = period_bounds_ms(period, timezone, now_ms)
        self._cache[key] = bounds
        return bounds
