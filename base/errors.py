"""User-facing errors: one class per kind of mistake, each printed as a single line by the CLIs."""

import errno
import re
from typing import Any

# What a write refused for want of space answers: a full file system, or a quota.
_FULL_DISK = {errno.ENOSPC, errno.EDQUOT}


class GqaError(Exception):
    """Base class: anything the user can fix. CLIs print `str(error)` on one line and exit 2."""


class InvalidGroupsError(GqaError):
    """The requested number of KV heads does not fit the model."""


class UnsupportedModelError(GqaError):
    """The architecture cannot hold grouped-query attention in transformers."""


class CheckpointError(GqaError):
    """A source checkpoint is missing, corrupt or disagrees with its config."""


class OutputError(GqaError):
    """The output path cannot be written: it is (or holds) the source, a home or the root, something this project
    did not write, or a folder that cannot be written to."""


class OutputExistsError(OutputError):
    """The output folder exists and --force was not given."""


class OutputBusyError(OutputError):
    """Another process is writing the same output right now."""


class ConfigError(GqaError):
    """A recipe or option is unknown, missing or ill-typed."""


class DataError(GqaError):
    """Input data is missing, empty or unusable."""


class TokenizerMismatchError(GqaError):
    """Models to be compared do not share one tokenizer, so their scores would not be comparable."""


class DiskFullError(GqaError):
    """There is not enough free space to write the output."""


class DivergedError(GqaError):
    """Training produced a non-finite loss; nothing was exported and the last good checkpoint is kept."""


class CalibrationError(GqaError):
    """A calibrated conversion met NaN or infinite statistics or fitted weights; nothing is written."""


class PublishError(GqaError):
    """Nothing to publish, or no way to upload it."""


class EvaluationError(GqaError):
    """A model could not be evaluated. When it was a candidate, `report` is the EvaluationResult `evaluate` would
    have returned, with the others' results; None when there is no report (the base failed: it is measured first)."""

    report: Any = None


def one_line(error: BaseException, limit: int = 300) -> str:
    """Another library's exception as part of a one-line message: whitespace (newlines too) collapsed, so a
    multi-line message keeps its detail (YAML's line and column, the Hub's reason), cut at `limit` characters;
    the exception's type name when it says nothing."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def is_full_disk(error: BaseException) -> bool:
    """Whether `error` is a write refused for want of space: a full file system (ENOSPC) or a quota (EDQUOT)."""
    return isinstance(error, OSError) and error.errno in _FULL_DISK
