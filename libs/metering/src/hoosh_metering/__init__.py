"""hoosh metering: token pools (hierarchy, periods, USD caps), reservations and key
limits in Redis, each step one atomic Lua call. See docs/tenancy.md.

The gRPC client lives in :mod:`hoosh_metering.client` (imported on its own, so
in-process users need no generated stubs).
"""

from .errors import (
    BudgetError,
    BudgetExhausted,
    BudgetUnavailable,
    InvalidAmount,
    InvalidArgument,
    NotOwner,
    PoolExists,
    PoolInUse,
    PoolNotFound,
    RateLimited,
)
from .limits import KeyLimiter, KeyLimits
from .periods import PERIODS, period_bounds_ms, period_start_ms, validate_period
from .pools import (
    UNSET,
    BudgetStore,
    CheckResult,
    CostLine,
    EndResult,
    LedgerLine,
    PeriodRoll,
    PoolSpec,
    PoolState,
    PoolView,
    Reservation,
    StoreState,
    TreeState,
    cost_micros,
    reap_forever,
)
from .redis import RedisClient, connect_redis

__all__ = [
    "PERIODS",
    "UNSET",
    "BudgetError",
    "BudgetExhausted",
    "BudgetStore",
    "BudgetUnavailable",
    "CheckResult",
    "CostLine",
    "EndResult",
    "InvalidAmount",
    "InvalidArgument",
    "KeyLimiter",
    "KeyLimits",
    "LedgerLine",
    "NotOwner",
    "PeriodRoll",
    "PoolExists",
    "PoolInUse",
    "PoolNotFound",
    "PoolSpec",
    "PoolState",
    "PoolView",
    "RateLimited",
    "RedisClient",
    "Reservation",
    "StoreState",
    "TreeState",
    "connect_redis",
    "cost_micros",
    "period_bounds_ms",
    "period_start_ms",
    "reap_forever",
    "validate_period",
]
