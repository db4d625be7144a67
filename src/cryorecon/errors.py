"""Exceptions with distinct exit codes, so the CLI can report one clear message per failure."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (each run of whitespace becomes one space)."""
    return " ".join(str(exc).split())


class CryoreconError(Exception):
    """Base class: a user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(CryoreconError):
    """Bad or unreadable input (a file, a column, a particle). Names the file and location."""

    exit_code = 2


class OutputExistsError(CryoreconError):
    """Refusing to overwrite an existing output."""

    exit_code = 3
