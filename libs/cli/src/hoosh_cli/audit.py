"""`hoosh audit ...`: the audit log's offline tools.

``hoosh audit verify [DIR]`` checks a log from its segment files, its key(s) and its
last checkpoint alone (no running service needed) and names the first bad entry or
the missing range; ``hoosh audit checkpoint`` prints the stored checkpoint, to keep a
copy somewhere the log's host cannot write. Both come from the ``hoosh-audit``
package (installed beside this one by ``make install``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir)


def _missing_package() -> int:
    print("hoosh audit needs the hoosh-audit package: pip install -e services/audit", file=sys.stderr)
    return 2


def verify(args: argparse.Namespace) -> int:
    try:
        from hoosh_audit.cli import run_verify
    except ImportError:
        return _missing_package()
    state_dir = _state_dir(args)
    return run_verify(args, default_dir=state_dir / "audit", fallback_key_file=state_dir / "audit.key")


def checkpoint(args: argparse.Namespace) -> int:
    try:
        from hoosh_audit.checkpoint import read_checkpoint_sync
        from hoosh_audit.cli import checkpoint_location
        from hoosh_audit.errors import CheckpointError
        from redis.exceptions import RedisError
    except ImportError:
        return _missing_package()
    url, key = checkpoint_location(args.redis_url, args.checkpoint_key)
    try:
        found = read_checkpoint_sync(url, key)
    except (RedisError, OSError, CheckpointError) as exc:
        print(f"hoosh audit checkpoint: cannot read {key} from {url}: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print(f"hoosh audit checkpoint: no checkpoint at {key} in {url}", file=sys.stderr)
        return 1
    out: dict[str, Any] = found.to_dict()
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def add_commands(commands: Any) -> None:
    """Add the ``audit`` command group to the top-level subparsers."""
    audit = commands.add_parser("audit", help="the audit log: verify it offline, print its checkpoint")
    audit_commands = audit.add_subparsers(dest="action", required=True)
    state = os.environ.get("HOOSH_STATE_DIR", ".hoosh")

    check = audit_commands.add_parser(
        "verify",
        help="verify a log from its files, key(s) and last checkpoint; name the first bad entry or missing range",
        description="Exit 0: the log verifies; 1: it does not (the JSON report names where); 2: cannot run.",
    )
    try:
        from hoosh_audit.cli import add_verify_arguments
    except ImportError:
        check.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        add_verify_arguments(check, default_dir=f"{state}/audit")
    check.add_argument("--state-dir", default=state, help="hoosh up's state dir (its audit.key is the default key)")
    check.set_defaults(run=verify)

    show = audit_commands.add_parser("checkpoint", help="print the last checkpoint stored in Redis (JSON)")
    show.add_argument("--redis-url", default=None, help=f"default: $HOOSH_REDIS_URL or {DEFAULT_REDIS_URL}")
    show.add_argument(
        "--checkpoint-key",
        default=None,
        help="default: $HOOSH_AUDIT_CHECKPOINT_PREFIX + $HOOSH_NATS_STREAM:$HOOSH_AUDIT_CONSUMER:checkpoint",
    )
    show.set_defaults(run=checkpoint)


def run(args: argparse.Namespace) -> int:
    result: int = args.run(args)
    return result
