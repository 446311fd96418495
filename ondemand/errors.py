"""The error hierarchy.  Every error a user can cause carries a stable `code` and a message that
says what to do next; the HTTP layer maps codes to statuses in one place (server/http_errors)."""

from __future__ import annotations


class OndemandError(Exception):
    """Base of every error we raise on purpose.  `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class ConfigError(OndemandError):
    """A bad configuration value; the message starts with the key path (`worker.dtype: ...`)."""

    code = "config"


class AudioError(OndemandError):
    """Input audio we refuse.  Codes: empty, too_short, too_long, non_finite, undecodable,
    unsupported_media_type, too_large."""

    code = "bad_audio"


class ModelError(OndemandError):
    """A model that cannot be resolved, loaded or validated.  The message says how to fix it."""

    code = "model"


class ModelNotFoundError(ModelError):
    code = "model_not_found"


class CheckpointError(ModelError):
    """Missing, mis-shaped or unreadable tensors; truncated or corrupt files."""

    code = "checkpoint"


class DeviceError(OndemandError):
    """A device or dtype that is not available here (e.g. `cuda` without a GPU, float16 on CPU)."""

    code = "device"


class OutOfMemory(OndemandError):
    """A batch did not fit in (GPU) memory; the caller may retry it smaller."""

    code = "out_of_memory"
