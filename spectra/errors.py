"""Problems a user can fix. The CLI prints these as one line, without a traceback; bugs raise anything else."""

from __future__ import annotations


class SpectraError(Exception):
    """A problem with the inputs or settings that the user can fix; the message says what, where and what next."""


class CheckpointError(SpectraError):
    """A checkpoint is missing, unreadable, corrupt, or not in a format spectra reads (safetensors)."""


class MismatchError(SpectraError):
    """Base and tuned checkpoints do not line up (no common tensors, incompatible adapter)."""


class OptionsError(SpectraError, ValueError):
    """A setting is out of range or malformed."""
