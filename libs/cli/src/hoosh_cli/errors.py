"""The CLI's failures, each with the exit status it ends the command with.

0 ok; 1 the edge refused or failed (an error answer, a broken stream, a reload not
applied); 2 bad usage (argparse, a missing message, an unreadable file or config);
3 the edge cannot be reached; 4 no usable key (none found, 401, 403); 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported in one line on stderr; ``exit_code`` ends the command."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    """The command line (or a file it names) cannot be used as given."""

    exit_code = EXIT_USAGE


class UnreachableError(CliError):
    """No connection to the edge."""

    exit_code = EXIT_UNREACHABLE


class AuthError(CliError):
    """No key where one is needed, or the edge refused the key (401, 403)."""

    exit_code = EXIT_AUTH


class ServerError(CliError):
    """The edge answered with an error (or something that is not the answer)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
