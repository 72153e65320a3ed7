"""Errors a user can fix. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; its message says how to fix it."""

    exit_code = 1


class ConfigError(UserError):
    """An unknown key, a wrong type or an impossible value in the configuration."""

    exit_code = 2


class DataError(UserError):
    """Input data that cannot be used as given (missing, malformed, too small)."""

    exit_code = 2


class PrivacyBudgetError(UserError):
    """Planned training would spend more privacy budget than configured."""

    exit_code = 2


class RunDirError(UserError):
    """A run directory that is missing, incomplete or was edited."""

    exit_code = 2


class TrainingDivergedError(UserError):
    """Training produced a non-finite loss or weights; nothing trained by it may be recorded as a result."""

    exit_code = 2

    def __init__(self, message: str, *, epoch: int = 0):
        super().__init__(message)
        self.epoch = epoch  # 1-based epoch whose loss or weights were not finite


class DiskFullError(UserError):
    """The disk filled up while writing (``OSError`` ENOSPC): nothing half-written is left looking complete."""

    exit_code = 1


# error class name -> class, to re-raise an error a Flower app wrote down (federated/app/workdir.py) as the same type
USER_ERRORS: dict[str, type[UserError]] = {
    cls.__name__: cls
    for cls in (
        UserError,
        ConfigError,
        DataError,
        PrivacyBudgetError,
        RunDirError,
        TrainingDivergedError,
        DiskFullError,
    )
}
