"""User-facing errors.

Every error a user can trigger with bad input is a :class:`QuantpredictError` whose message names the input and
the fix. The CLI prints the message and exits non-zero (no traceback unless ``--debug``).
"""

from __future__ import annotations


class QuantpredictError(Exception):
    """Base class of every error quantpredict raises for bad input or state."""


class FormatError(QuantpredictError, ValueError):
    """Unknown format name, bad block size, or a tensor the format cannot take (NaN/Inf)."""


class RecipeError(QuantpredictError, ValueError):
    """A recipe or evaluation setting with an unknown method, an out-of-range option or an unparseable label."""


class DataError(QuantpredictError, ValueError):
    """Unknown data set or split, or empty/invalid calibration data."""


class ModelError(QuantpredictError, ValueError):
    """A model that cannot be found or loaded: no config, no tokenizer, weights missing, truncated or not a checkpoint
    at all, or weights that are not finite."""


class OutputError(QuantpredictError, ValueError):
    """An output path (``--out``, ``--plot``, ``--store``) this user cannot write: its folder is read-only, a file
    stands where a folder must be, or writing it failed."""


class UnsupportedArchitectureError(QuantpredictError, ValueError):
    """A model family that the ``arch`` adapters do not know."""


class StoreError(QuantpredictError, ValueError):
    """A run store that is corrupt, of a newer schema, or not a run store at all."""


class PredictorError(QuantpredictError, ValueError):
    """A saved predictor that is missing, corrupt, or fitted on a different feature schema."""


class ResourceError(QuantpredictError, ValueError):
    """A device that is not available, a compute dtype it cannot run, or an unreadable memory budget."""


class DeviceError(ResourceError):
    """A ``--device`` / ``device=`` that this machine does not have (e.g. ``cuda`` without a CUDA build or GPU)."""
