"""Errors a user can cause. Each names the problem; the CLI prints them without a traceback."""


class LlmquantError(Exception):
    """Base class of every error llmquant raises on bad input."""


class ConfigError(LlmquantError, ValueError):
    """A quantization setting is out of range or inconsistent."""


class ModelNotFoundError(LlmquantError, FileNotFoundError):
    """The model name or path does not resolve to a model."""


class UnsupportedArchitectureError(LlmquantError):
    """The model family has no architecture map."""


class CheckpointError(LlmquantError):
    """A checkpoint on disk is unreadable, inconsistent or not in a format we read."""


class OutputExistsError(LlmquantError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class DataError(LlmquantError):
    """A corpus is unknown, unreadable, or too short for what was asked."""


class OutputWriteError(LlmquantError, OSError):
    """Writing the output failed (a full disk, a read-only folder); nothing was left at the output path."""
