"""Sweep planning: one :class:`RunSpec` per (model, recipe, evaluation setting), and the run key that names it.

Planning is a pure function of its arguments so that a resumed sweep plans exactly the same grid and skips the
keys the store already holds.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import quantpredict

# Part of every run key. Bump the suffix when what a run measures changes meaning (a new evaluation protocol, a fixed
# quantizer bug) so that old rows stop counting as done; plain refactors keep it, so commits do not void a sweep.
CODE_VERSION = f"{quantpredict.__version__}+m1"

RECIPE_FIELDS = ("weight_format", "block_size", "method", "smoothquant_alpha", "act_format")


def recipe_label(weight_format: str, block_size: int | None, method: str, smoothquant_alpha: float | None = None,
                 act_format: str | None = None) -> str:
    """The recipe's stable label, e.g. ``mxint4_b128-gptq-sq0.5-a_mxint8``: :attr:`quantpredict.quantize.Recipe.label`.

    The PTQ backend's label is canonical (a block size equal to the format's default is left out, so planning
    ``32`` and ``None`` for an MX format gives one run). Only when the backend cannot build the recipe (an unknown
    format; the run will then fail and be recorded so) is the label written here in the same grammar.
    """
    try:
        from quantpredict.quantize import Recipe

        if _qat_init(method) is not None:  # QAT: the init recipe's label with method segment `qat`/`qat_gptq`
            from quantpredict.qat.runs import qat_label

            init = Recipe(**{k: v for k, v in {"weight_format": weight_format, "block_size": block_size,
                                                "smoothquant_alpha": smoothquant_alpha,
                                                "act_format": act_format}.items() if v is not None})
            return qat_label(init, _qat_init(method))
        kwargs = {"weight_format": weight_format, "block_size": block_size, "method": method,
                  "smoothquant_alpha": smoothquant_alpha, "act_format": act_format}
        return Recipe(**{k: v for k, v in kwargs.items() if v is not None}).label
    except (ImportError, ValueError, TypeError):
        pass
    parts = [f"{weight_format}_b{int(block_size)}" if block_size is not None else str(weight_format), str(method)]
    if smoothquant_alpha is not None:
        parts.append(f"sq{float(smoothquant_alpha):g}")
    if act_format is not None:
        parts.append(f"a_{act_format}")
    return "-".join(parts)


def eval_label(seq_len: int, eval_max_windows: int | None) -> str:
    """The evaluation setting part of a run key: ``seq256-w256`` (``wall`` for the whole test split)."""
    return f"seq{int(seq_len)}-w{'all' if eval_max_windows is None else int(eval_max_windows)}"


def run_key(model_id: str, recipe: str, code_version: str = CODE_VERSION, *, seq_len: int = 256,
            eval_max_windows: int | None = None) -> str:
    """The store's primary key: ``model_id|recipe label|code version|evaluation setting``.

    ``model_id`` should carry the weights hash (``name@1a2b3c4d5e6f``, see :func:`quantpredict.runs.model_id`)
    so that retraining a zoo model under the same name yields new keys instead of silently reusing stale runs.
    The evaluation setting is part of the key because measuring on a different number of test windows is a
    different measurement.
    """
    for name, value in (("model_id", model_id), ("recipe", recipe), ("code_version", code_version)):
        if not value or "|" in str(value):
            raise ValueError(f"run_key: {name} must be a non-empty string without '|', got {value!r}")
    return "|".join((str(model_id), str(recipe), str(code_version), eval_label(seq_len, eval_max_windows)))


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a model, a recipe and how it is evaluated. Picklable, so it travels to Dask workers.

    ``model`` is what :func:`quantpredict.models.load` takes (zoo name or path); ``model_id`` is the name plus the
    weights hash (equal to ``model`` when the caller did not identify the weights).
    """

    model: str
    weight_format: str
    method: str
    block_size: int | None = None
    smoothquant_alpha: float | None = None
    act_format: str | None = None
    seq_len: int = 256
    eval_max_windows: int | None = None
    model_id: str = ""
    code_version: str = CODE_VERSION

    def __post_init__(self) -> None:
        if not self.model_id:
            object.__setattr__(self, "model_id", self.model)

    @cached_property
    def label(self) -> str:
        """The recipe label (see :func:`recipe_label`)."""
        return recipe_label(self.weight_format, self.block_size, self.method, self.smoothquant_alpha,
                            self.act_format)

    @cached_property
    def key(self) -> str:
        """The run key (see :func:`run_key`)."""
        return run_key(self.model_id, self.label, self.code_version, seq_len=self.seq_len,
                       eval_max_windows=self.eval_max_windows)

    def recipe_fields(self) -> dict:
        """The recipe's fields as a dict (``None`` for defaults)."""
        return {f: getattr(self, f) for f in RECIPE_FIELDS}

    def recipe(self):
        """The :class:`quantpredict.quantize.Recipe` of this run (imports the PTQ backend)."""
        from quantpredict.quantize import Recipe

        # None means "the backend's default", so only set fields are passed on.
        kwargs = {k: v for k, v in self.recipe_fields().items() if v is not None}
        if _qat_init(self.method) is not None:  # a QAT run's recipe is its PTQ init's (rtn for qat, gptq for qat_gptq)
            kwargs["method"] = _qat_init(self.method)
        return Recipe(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self) | {"recipe": self.label, "run_key": self.key}


def _qat_init(method: str) -> str | None:
    """The PTQ init of a QAT run-store method (``qat`` -> ``rtn``, ``qat_gptq`` -> ``gptq``), else ``None``."""
    try:
        from quantpredict.qat.runs import QAT_METHODS
    except ImportError:
        return None
    return QAT_METHODS.get(method)


def _none_or(value, cast):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "default", "-")):
        return None
    return cast(value)


def plan_runs(models: Sequence[str], formats: Sequence[str], methods: Sequence[str], *,
              smoothquant: Iterable[float | None] = (None,), act_formats: Iterable[str | None] = (None,),
              block_sizes: Iterable[int | None] = (None,), seq_len: int = 256, eval_max_windows: int | None = None,
              model_ids: Mapping[str, str] | None = None, code_version: str = CODE_VERSION,
              block_size_formats: Sequence[str] | None = None) -> list[RunSpec]:
    """The full grid ``models x formats x block_sizes x methods x smoothquant x act_formats`` as run specs.

    A pure function: the order is the nested-loop order of the arguments (models outermost, so a model's runs are
    adjacent), duplicates are dropped keeping the first. ``None`` (or the strings ``"none"``/``"default"``) in
    ``block_sizes``, ``smoothquant`` and ``act_formats`` mean the format's default block, no SmoothQuant and
    weight-only quantization. ``model_ids`` maps a model to its identified name (with weights hash).
    Block sizes apply to every format, or, with ``block_size_formats`` (name prefixes such as ``("mx",)``), only
    to the formats starting with one of them; the others get their default (``None``) alone. So one call plans
    MX formats at block sizes 32 and 128 next to per-channel INT formats.
    """
    if not models or not formats or not methods:
        raise ValueError("plan_runs needs at least one model, one format and one method")
    bss = [_none_or(b, int) for b in block_sizes] or [None]
    sqs = [_none_or(a, float) for a in smoothquant] or [None]
    acts = [_none_or(a, str) for a in act_formats] or [None]
    ids = dict(model_ids or {})
    seen: set[str] = set()
    out: list[RunSpec] = []
    prefixes = tuple(block_size_formats) if block_size_formats is not None else None

    def sizes(fmt: str) -> list[int | None]:
        return bss if prefixes is None or str(fmt).startswith(prefixes) else [None]

    grid = ((m, f, b, meth, sq, a) for m in models for f in formats for b in sizes(f)
            for meth, sq, a in itertools.product(methods, sqs, acts))
    for model, fmt, bs, method, sq, act in grid:
        spec = RunSpec(model=str(model), weight_format=str(fmt), method=str(method), block_size=bs,
                       smoothquant_alpha=sq, act_format=act, seq_len=int(seq_len),
                       eval_max_windows=None if eval_max_windows is None else int(eval_max_windows),
                       model_id=ids.get(model, str(model)), code_version=code_version)
        if spec.key not in seen:
            seen.add(spec.key)
            out.append(spec)
    return out


def short_hash(data: bytes, n: int = 12) -> str:
    return hashlib.sha256(data).hexdigest()[:n]
