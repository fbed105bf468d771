"""User-facing errors: one actionable line each. The CLI prints them without a traceback."""

from __future__ import annotations


class LowrankError(Exception):
    """A problem with the user's input or environment (exit code 1).

    The message is the whole story: what went wrong, where, and what to do about it.
    """


class CheckpointError(LowrankError):
    """A model path or file that cannot be read as a checkpoint."""


class BudgetError(LowrankError):
    """A parameter budget that is out of range or cannot be met."""


class CalibrationError(LowrankError):
    """Calibration text that is missing, unreadable or too short."""


class FormatError(LowrankError):
    """A compressed output that is malformed (missing or misshapen factor tensors, bad config)."""


class InterruptedWithCheckpoint(LowrankError):
    """Ctrl-C (or SIGTERM) during finetune, or during factorize's pass 2: nothing was written to the output, and the
    message names the checkpoint to resume from (exit 130, 143 after SIGTERM)."""
