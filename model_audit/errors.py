"""Errors raised by model-audit.

Every error a user can cause is an :class:`AuditError`; its message says what was wrong and
what to do. The CLI prints the message without a traceback and exits with ``exit_code``.
"""
from __future__ import annotations


class AuditError(Exception):
    """Base class: a problem with the user's input or environment, reported without traceback."""

    exit_code = 2


class CheckpointError(AuditError):
    """The checkpoint file cannot be read, is unsafe, or does not match the architecture."""


class ArchitectureError(AuditError):
    """The architecture name or factory is unknown or cannot be built."""


class ProbeError(AuditError):
    """The probe set cannot be read or does not fit the model."""


class ConfigError(AuditError):
    """A configuration file or option value is invalid."""


class OutputError(AuditError):
    """An output path is invalid (e.g. it is an input) or cannot be written."""


class ReplayError(AuditError):
    """The replay or attribution cannot run (e.g. non-finite loss)."""


class EmptyInputError(AuditError):
    """There is nothing to audit: an empty probe set or a checkpoint without tensors."""


class EmptyProbeError(ProbeError, EmptyInputError):
    """The probe set holds no images."""


class EmptyCheckpointError(CheckpointError, EmptyInputError):
    """The checkpoint holds no tensors."""


class DistributedError(AuditError):
    """A distributed run (torchrun) cannot start, or another rank failed."""
