"""Errors users see: one line that names the file or value and the problem."""


class SslEmError(Exception):
    """Base class; the CLI prints ``ssl-em: error: <message>`` and exits 2 instead of a traceback."""


class VolumeError(SslEmError, ValueError):
    """A volume spec, file or its metadata cannot be used."""


class ConfigError(SslEmError, ValueError):
    """A model, data or training configuration is inconsistent (e.g. patch does not divide crop)."""


class CheckpointError(SslEmError, ValueError):
    """A weight file or its sidecar is missing, corrupt, mismatched or unsafe."""


class LabelError(SslEmError, ValueError):
    """Labels are empty, misshaped, NaN or hold values outside the task's set."""
