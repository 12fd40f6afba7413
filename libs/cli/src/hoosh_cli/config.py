"""The CLI's own config file: where the edge is and the keys to present, so they need
not be typed (or put in the environment) every time.

Path: ``$HOOSH_CLI_CONFIG``, else ``$XDG_CONFIG_HOME/hoosh/config.toml``, else
``~/.config/hoosh/config.toml``. TOML, every field optional::

    url = "http://127.0.0.1:8088"     # the edge
    api_key = "sk-hoosh-..."          # models, chat, transcribe, costs, audit, hardware
    admin_key = "sk-hoosh-admin-..."  # keys, pools, status, providers, reload
    model = "smollm2-135m-instruct"   # hoosh chat's default --model
    stt_model = "whisper-tiny.en"     # hoosh transcribe's default --model

A file holding a key should be readable by its owner alone (``chmod 600``): the CLI
warns on stderr when it is not.
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

FIELDS = ("url", "api_key", "admin_key", "model", "stt_model")


@dataclass(frozen=True, slots=True)
class CliConfig:
    """What the config file holds (None: not set there)."""

    path: Path
    url: str | None = None
    api_key: str | None = None
    admin_key: str | None = None
    model: str | None = None
    stt_model: str | None = None


def config_path() -> Path:
    """Where the config file is looked for (it need not exist)."""
    if os.environ.get("HOOSH_CLI_CONFIG"):
        return Path(os.environ["HOOSH_CLI_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hoosh" / "config.toml"


def load_config(path: Path | None = None) -> CliConfig:
    """The config file's fields; an absent file is an empty config, a broken one a
    UsageError naming the file and the problem."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return CliConfig(path)
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"the config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UsageError(f"the config file {path} has unknown fields {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    values: dict[str, str] = {}
    for name in FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"the config file {path}: {name} must be a non-empty string")
        values[name] = value.strip()
    if ("api_key" in values or "admin_key" in values) and _shared(path):
        print(f"hoosh: warning: {path} holds a key and others can read it (chmod 600 {path})", file=sys.stderr)
    return CliConfig(path, **values)


def _shared(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False
