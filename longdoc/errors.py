"""One exception family for everything a user can cause; the CLI turns it into one line and an exit code."""

from __future__ import annotations

# Documented exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_DOES_NOT_FIT = 4
EXIT_INTERRUPTED = 130


class LongdocError(Exception):
    """An error with a message meant for the user; never shown with a traceback."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(LongdocError):
    """Bad option values or combinations."""

    exit_code = EXIT_USAGE


class InputError(LongdocError):
    """Missing, unreadable, empty or unsupported input."""

    exit_code = EXIT_INPUT


class DoesNotFitError(LongdocError):
    """The prompt exceeds the context the model and settings can take, or memory."""

    exit_code = EXIT_DOES_NOT_FIT


class ModelError(LongdocError):
    """The model could not be found, verified or loaded."""

    exit_code = EXIT_INPUT


class ModelNotInstalledError(ModelError):
    """A known model whose packages are not installed: the fix is the pip command in the message, so it
    exits as a usage error, not as a damaged or unreadable model."""

    exit_code = EXIT_USAGE


class RemoteError(LongdocError):
    """The ``--endpoint`` server could not be reached, or failed or refused a request (5xx, a 429 that
    outlasted the retries, a 400 that is not about length): the model is out of reach, as a local model
    that cannot be loaded is (``ModelError``)."""

    exit_code = EXIT_INPUT
