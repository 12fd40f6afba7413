"""The offline verifier's command line, shared by ``hoosh audit verify`` and
``python -m hoosh_audit verify``.

It needs only the segment files, the key(s) and the last checkpoint: from Redis (the
key the service writes), or given as a file or as JSON text. It prints the report as
JSON and exits 0 when the log verifies, 1 when it does not (the report names the first
bad entry, its segment and seq, or the range of entries that is missing), 2 when it
cannot run (no key, Redis unreachable, a checkpoint that is not one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hoosh_audit.checkpoint import Checkpoint, checkpoint_key, read_checkpoint_sync
from hoosh_audit.errors import AuditError, CheckpointError, ConfigError
from hoosh_audit.keys import Keyring, load_keyring
from hoosh_audit.verification import verify_log, verify_path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def add_verify_arguments(parser: argparse.ArgumentParser, *, default_dir: str | None) -> None:
    parser.add_argument(
        "dir",
        nargs="?",
        default=None,
        help=f"the audit directory (default: $HOOSH_AUDIT_DIR or {default_dir})" if default_dir else "the audit dir",
    )
    parser.add_argument("--file", type=Path, default=None, help="a log directory or a pre-segment log file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        default=None,
        help="the last checkpoint: a file holding its JSON, or the JSON itself (default: read it from Redis)",
    )
    source.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="verify without one (a cut tail or a deleted log then goes unnoticed)",
    )
    parser.add_argument("--redis-url", default=None, help="Redis holding the checkpoint (default: $HOOSH_REDIS_URL)")
    parser.add_argument(
        "--checkpoint-key",
        default=None,
        help="its key (default: $HOOSH_AUDIT_CHECKPOINT_PREFIX + $HOOSH_NATS_STREAM:$HOOSH_AUDIT_CONSUMER:checkpoint)",
    )
    parser.add_argument(
        "--keys-file",
        type=Path,
        default=None,
        help='JSON {"key id": "secret"} or ["secret"] (added to $HOOSH_AUDIT_HMAC_KEY / _KEYS / _KEYS_FILE)',
    )


def _keyring(args: argparse.Namespace, fallback_key_file: Path | None) -> Keyring:
    """The keys from the environment (as the service reads them) plus --keys-file; with
    neither, ``fallback_key_file`` (the key `hoosh up` keeps in its state directory)."""
    env = os.environ
    rings: list[Keyring] = []
    if env.get("HOOSH_AUDIT_HMAC_KEY") or env.get("HOOSH_AUDIT_HMAC_KEYS") or env.get("HOOSH_AUDIT_HMAC_KEYS_FILE"):
        rings.append(
            load_keyring(
                key=env.get("HOOSH_AUDIT_HMAC_KEY") or None,
                key_id=env.get("HOOSH_AUDIT_HMAC_KEY_ID") or None,
                keys_json=env.get("HOOSH_AUDIT_HMAC_KEYS") or None,
                keys_file=Path(env["HOOSH_AUDIT_HMAC_KEYS_FILE"]) if env.get("HOOSH_AUDIT_HMAC_KEYS_FILE") else None,
                verify_only=True,
            )
        )
    if args.keys_file is not None:
        try:
            rings.append(load_keyring(keys_file=args.keys_file, verify_only=True))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("HOOSH_AUDIT_HMAC_KEYS_FILE", "--keys-file")) from None
    if not rings and fallback_key_file is not None and fallback_key_file.is_file():
        secret = fallback_key_file.read_text(encoding="utf-8").strip()
        if secret:
            rings.append(Keyring.single(secret.encode("utf-8")))
    if not rings:
        raise ConfigError("no key: set HOOSH_AUDIT_HMAC_KEY (or HOOSH_AUDIT_HMAC_KEYS[_FILE]) or give --keys-file")
    keys: dict[str, bytes] = {}
    for ring in rings:
        for kid, raw in ring.keys.items():
            if kid in keys and keys[kid] != raw:
                raise ConfigError(f"key id {kid!r} is configured twice with different secrets")
            keys[kid] = raw
    return Keyring(keys, rings[0].current_id)


def checkpoint_location(redis_url: str | None, key: str | None) -> tuple[str, str]:
    """(Redis URL, checkpoint key): as given, else as the service running with this
    environment stores it."""
    env = os.environ
    url = redis_url or env.get("HOOSH_REDIS_URL") or DEFAULT_REDIS_URL
    key = key or checkpoint_key(
        env.get("HOOSH_AUDIT_CHECKPOINT_PREFIX", "hoosh:audit:"),
        env.get("HOOSH_NATS_STREAM", "HOOSH_EVENTS"),
        env.get("HOOSH_AUDIT_CONSUMER", "audit"),
    )
    return url, key


def _checkpoint(args: argparse.Namespace) -> tuple[Checkpoint | None, str]:
    """The checkpoint and where it came from ("" when --no-checkpoint)."""
    if args.no_checkpoint:
        return None, ""
    if args.checkpoint is not None:
        text = args.checkpoint.strip()
        if text.startswith("{"):
            return Checkpoint.parse(text), "argument"
        try:
            return Checkpoint.parse(Path(text).read_text(encoding="utf-8")), text
        except OSError as exc:
            raise CheckpointError(f"cannot read the checkpoint file {text}: {exc.strerror}") from None
    url, key = checkpoint_location(args.redis_url, args.checkpoint_key)
    import redis.exceptions  # the client library, only needed here

    try:
        checkpoint = read_checkpoint_sync(url, key)
    except (redis.exceptions.RedisError, OSError) as exc:
        raise CheckpointError(
            f"cannot read the checkpoint {key} from {url} ({exc}); give it with --checkpoint, "
            "or verify without one (--no-checkpoint)"
        ) from None
    if checkpoint is None:
        raise CheckpointError(
            f"no checkpoint at {key} in {url}: without one a cut tail or a deleted log cannot be seen; "
            "give it with --checkpoint or --checkpoint-key, or verify without one (--no-checkpoint)"
        )
    return checkpoint, f"{url} {key}"


def run_verify(args: argparse.Namespace, *, default_dir: Path, fallback_key_file: Path | None = None) -> int:
    """Verify, print the JSON report, return the exit status (0 valid, 1 not, 2 cannot run)."""
    try:
        keyring = _keyring(args, fallback_key_file)
        checkpoint, source = _checkpoint(args)
    except AuditError as exc:
        print(f"hoosh audit verify: {exc}", file=sys.stderr)
        return 2
    target = args.file or (Path(args.dir) if args.dir else None) or Path(os.environ.get("HOOSH_AUDIT_DIR", default_dir))
    out: dict[str, Any]
    if target.is_file() and not target.is_symlink():
        result = verify_path(target, keyring, checkpoint)
        out = {"file": str(target), **result._asdict(), "entries": result.count}
        out.pop("count")
        valid = result.valid
    else:
        directory = target.parent if target.name == "audit.jsonl" else target
        report = verify_log(directory, keyring, checkpoint)
        out = {"file": str(target), **report.to_dict()}
        valid = report.valid
    out["checkpoint_source"] = source
    if checkpoint is None:
        out.setdefault("warnings", []).append("no checkpoint: a cut tail or a deleted log cannot be detected")
    print(json.dumps(out, indent=2))
    return 0 if valid else 1
