"""Errors a user can act on: each one carries a one-line message that says what is wrong and what to do."""


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception as one short line for our own message: its type and its text, whitespace folded."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


class MedAnomalyError(Exception):
    """Base class of every error the command line reports as one line, without a traceback."""

    exit_code = 2


class InputError(MedAnomalyError):
    """The input volume cannot be used (missing, corrupt, wrong kind of image, implausible values)."""


class ModelError(MedAnomalyError):
    """A model bundle is missing, tampered with or incompatible with this version."""


class OutputError(MedAnomalyError):
    """Results cannot be written where the user asked."""


class Cancelled(MedAnomalyError):
    """The caller asked to stop; nothing was written."""

    exit_code = 130
