"""The argument parser: usage errors in one line (exit 2), and the options every
command takes, accepted before or after the subcommand."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import EXIT_USAGE

# A command: the parsed arguments in, the exit status out (failures raise CliError).
Command = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse with its error in one line: ``hoosh keys create: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite(text: str) -> float:
    """A number that is neither infinite nor NaN (JSON has neither)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds above 0 (--timeout, --interval)."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return value


def common_options(parser: argparse.ArgumentParser, *, state_dir: bool = True) -> None:
    """--url, --api-key, --admin-key, --timeout, --json (and --state-dir). Their defaults
    are left out of the namespace (SUPPRESS): given before the subcommand or after it,
    the value given is the one kept (client.option reads them)."""
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the edge (default: $HOOSH_URL, the config file, http://127.0.0.1:8088)",
    )
    group.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="API key (default: $HOOSH_API_KEY, the config file's api_key)"
    )
    group.add_argument(
        "--admin-key",
        default=argparse.SUPPRESS,
        help="admin key (default: $HOOSH_ADMIN_KEY, $HOOSH_ADMIN_KEY_FILE, the config file, <state dir>/admin.key)",
    )
    group.add_argument("--timeout", type=seconds, default=argparse.SUPPRESS, help="seconds per request (default 60)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts")
    if state_dir:
        group.add_argument(
            "--state-dir", default=argparse.SUPPRESS, help="hoosh up's state dir (default: $HOOSH_STATE_DIR or .hoosh)"
        )


def command(
    commands: Any, name: str, run: Command, help_text: str, *, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand with the common options that runs ``run``."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=description or help_text)
    common_options(parser)
    parser.set_defaults(run=run)
    return parser


def group(commands: Any, name: str, help_text: str) -> Any:
    """A command group (``hoosh keys ...``): its own subcommands, one of them required."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")
