"""Sweep planning: one :class:`RunSpec` per (model, recipe, evaluation setting), and the run key that names it.

Planning is a pure function of its arguments so that a resumed sweep plans exactly the same grid and skips the
keys the store already holds. Nothing here imports torch: a recipe and its label come from the torch-free
:mod:`quantpredict.recipe`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from quantpredict.recipe import CODE_VERSION, METHOD_NAMES, RECIPE_COLUMNS, EvalSetting, Recipe

RECIPE_FIELDS = RECIPE_COLUMNS  # the name this module always exported

__all__ = ["CODE_VERSION", "EVAL_COLUMNS", "RECIPE_FIELDS", "RunSpec", "SweepGrid", "eval_label", "evaluation_setting",
           "plan_runs", "recipe_label", "run_key", "split_values"]


def make_recipe(weight_format: str, block_size: int | None = None, method: str = "rtn",
                smoothquant_alpha: float | None = None, act_format: str | None = None, **options: Any) -> Recipe:
    """The :class:`Recipe` of run-store columns: ``method`` may be a QAT method name (``qat``, ``qat_gptq``)."""
    qat = method in ("qat", "qat_gptq")
    return Recipe(weight_format=weight_format, block_size=block_size,
                  method={"qat": "rtn", "qat_gptq": "gptq"}.get(method, method), qat=qat or options.pop("qat", False),
                  smoothquant_alpha=smoothquant_alpha, act_format=act_format, **options)


def recipe_label(weight_format: str, block_size: int | None, method: str, smoothquant_alpha: float | None = None,
                 act_format: str | None = None) -> str:
    """The recipe's stable label, e.g. ``mxint4_b128-gptq-sq0.5-a_mxint8``: :attr:`quantpredict.recipe.Recipe.label`
    of the recipe with these run-store columns (raises :class:`~quantpredict.errors.RecipeError` for an invalid
    one)."""
    return make_recipe(weight_format, block_size, method, smoothquant_alpha, act_format).label


#: The run-store column of each :class:`~quantpredict.recipe.EvalSetting` field (the store's names predate the
#: setting and stay, so the schema does not change): the one place a field meets its column name.
EVAL_COLUMNS = {"seq_len": "seq_len", "max_windows": "eval_max_windows", "bos": "eval_bos", "text": "eval_text"}


def _deprecated(what: str, instead: str) -> None:
    warnings.warn(f"{what} is deprecated; {instead}", DeprecationWarning, stacklevel=3)


def eval_label(seq_len: int, eval_max_windows: int | None, *, bos: bool = False, text: str | None = None) -> str:
    """Deprecated: ``EvalSetting(seq_len, max_windows, bos, text).label``."""
    _deprecated("eval_label()", "use EvalSetting(seq_len, max_windows, bos, text).label")
    return EvalSetting(int(seq_len), None if eval_max_windows is None else int(eval_max_windows), bool(bos),
                       text).label


def evaluation_setting(seq_len: int = 256, eval_max_windows: int | None = None, *, bos: bool = False,
                       text: str | None = None) -> EvalSetting:
    """Deprecated: build the :class:`~quantpredict.recipe.EvalSetting` itself (``max_windows``, not
    ``eval_max_windows``), or :meth:`RunSpec.from_columns` from run-store columns."""
    _deprecated("evaluation_setting()", "build EvalSetting(seq_len, max_windows, bos, text) itself")
    return EvalSetting(int(seq_len), None if eval_max_windows is None else int(eval_max_windows), bool(bos), text)


def _setting_of_columns(values: Mapping[str, Any]) -> EvalSetting:
    """The :class:`EvalSetting` of run-store columns (:data:`EVAL_COLUMNS`; absent or ``None``: the default)."""
    cast = {"seq_len": int, "max_windows": int, "bos": bool, "text": str}
    return EvalSetting(**{f: cast[f](values[c]) for f, c in EVAL_COLUMNS.items() if values.get(c) is not None})


def run_key(model_id: str, recipe: str, code_version: str = CODE_VERSION, evaluation: EvalSetting | None = None,
            **columns: Any) -> str:
    """The store's primary key: ``model_id|recipe label|code version|evaluation setting``.

    ``model_id`` should carry the weights hash (``name@1a2b3c4d5e6f``, see :func:`quantpredict.runs.model_id`)
    so that retraining a zoo model under the same name yields new keys instead of silently reusing stale runs.
    The evaluation setting (an :class:`~quantpredict.recipe.EvalSetting`, default ``EvalSetting()``) is part of the
    key because measuring on a different number of test windows (or with another protocol) is a different
    measurement. The run-store columns ``seq_len=`` / ``eval_max_windows=`` are deprecated keywords for it.
    """
    for name, value in (("model_id", model_id), ("recipe", recipe), ("code_version", code_version)):
        if not value or "|" in str(value):
            raise ValueError(f"run_key: {name} must be a non-empty string without '|', got {value!r}")
    if columns:
        unknown = set(columns) - {"seq_len", "eval_max_windows"}
        if unknown:
            raise TypeError(f"run_key() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        _deprecated("run_key(seq_len=, eval_max_windows=)", "pass evaluation=EvalSetting(seq_len, max_windows)")
        if evaluation is None:
            evaluation = EvalSetting(int(columns.get("seq_len", 256)), columns.get("eval_max_windows"))
    setting = evaluation if evaluation is not None else EvalSetting()
    return "|".join((str(model_id), str(recipe), str(code_version), setting.label))


#: The run-store recipe columns :meth:`RunSpec.from_columns` reads (the rest of a recipe needs its label).
_RECIPE_ARGS = ("weight_format", "block_size", "method", "smoothquant_alpha", "act_format")
#: What the constructor took before it took a Recipe and an EvalSetting (deprecated; see RunSpec.from_columns).
_LEGACY_ARGS = ("weight_format", "method", "block_size", "smoothquant_alpha", "act_format", "seq_len",
                "eval_max_windows", "model_id", "code_version")


@dataclass(frozen=True, init=False)
class RunSpec:
    """One run of a sweep: a model, a :class:`~quantpredict.recipe.Recipe` (``quantization``) and how it is evaluated
    (``evaluation``, an :class:`~quantpredict.recipe.EvalSetting`). Picklable, so it travels to Dask workers (its
    setting's ``text_file`` with it).

    ``model`` is what :func:`quantpredict.models.load` takes (zoo name or path); ``model_id`` is the name plus the
    weights hash (equal to ``model`` when the caller did not identify the weights).

    ``RunSpec("llama-s", Recipe("mxint4", method="gptq"), EvalSetting(256, 256))``; from run-store columns,
    :meth:`from_columns`. The older column form of the constructor (``RunSpec("llama-s", "mxint4", "gptq",
    eval_max_windows=256)``) still works, with a ``DeprecationWarning``.
    """

    model: str
    quantization: Recipe
    evaluation: EvalSetting
    model_id: str
    code_version: str

    def __init__(self, model: str, quantization: Recipe | None = None, evaluation: EvalSetting | None = None,
                 model_id: str = "", code_version: str = CODE_VERSION, **columns: Any) -> None:
        if not isinstance(quantization, Recipe) or not isinstance(evaluation, (EvalSetting, type(None))) or columns:
            spec = self._legacy(model, quantization, evaluation, model_id, code_version, columns)
            quantization, evaluation, model_id, code_version = (spec.quantization, spec.evaluation, spec.model_id,
                                                                spec.code_version)
        object.__setattr__(self, "model", str(model))
        object.__setattr__(self, "quantization", quantization)
        object.__setattr__(self, "evaluation", evaluation if evaluation is not None else EvalSetting())
        object.__setattr__(self, "model_id", model_id or str(model))
        object.__setattr__(self, "code_version", code_version)

    @classmethod
    def _legacy(cls, model, quantization, evaluation, model_id, code_version, columns) -> RunSpec:
        """The deprecated column form of the constructor, mapped to :meth:`from_columns`."""
        unknown = set(columns) - set(_LEGACY_ARGS) - {"bos", "eval_text", "evaluation"}
        if unknown:
            raise TypeError(f"RunSpec() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if isinstance(quantization, Recipe):  # RunSpec(model, recipe, ...) with leftover column keywords
            raise TypeError(f"RunSpec(model, recipe, evaluation): unexpected keyword(s) {sorted(columns)}; put the "
                            "evaluation columns in an EvalSetting")
        _deprecated("RunSpec(model, weight_format, method, ...)",
                    "use RunSpec(model, Recipe(...), EvalSetting(...)) or RunSpec.from_columns(...)")
        values = dict(columns)
        setting = values.pop("evaluation", None)
        if quantization is not None:
            values["weight_format"] = quantization
        if isinstance(evaluation, EvalSetting):
            setting = evaluation
        elif evaluation is not None:  # the third positional argument was the method
            values["method"] = evaluation
        if "bos" in values:
            values["eval_bos"] = values.pop("bos")
        spec = cls.from_columns({"model": model, "model_id": model_id, "code_version": code_version, **values})
        return spec if setting is None else cls(model, spec.quantization, setting, spec.model_id, spec.code_version)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any] | None = None, /, **values: Any) -> RunSpec:
        """The spec of run-store column values: a stored row (``RunStore.rows()``), or the columns as keywords.

        The recipe is the ``recipe`` label when there is one (every stored row has it), else the recipe columns
        (``weight_format``, ``method`` (``rtn`` by default; ``qat``/``qat_gptq`` for QAT), ``block_size``,
        ``smoothquant_alpha``, ``act_format``); the evaluation setting is the :data:`EVAL_COLUMNS`
        (``seq_len``, ``eval_max_windows``, ``eval_bos``, ``eval_text``); ``model`` is required, ``model_id``
        defaults to it and ``code_version`` to :data:`CODE_VERSION`. Other columns are ignored.
        ``RunSpec.from_columns(row).to_dict()`` gives the row's spec columns back."""
        row = {**dict(columns or {}), **values}
        if row.get("recipe"):
            recipe = Recipe.from_label(str(row["recipe"]))
        else:
            args = {k: row.get(k) for k in _RECIPE_ARGS}
            recipe = make_recipe(args.pop("weight_format"), args.pop("block_size"), args.pop("method") or "rtn",
                                 **args)
        return cls(str(row["model"]), recipe, _setting_of_columns(row), model_id=row.get("model_id") or "",
                   code_version=row.get("code_version") or CODE_VERSION)

    # the run-store columns, read off the recipe and the evaluation setting
    @property
    def weight_format(self) -> str:
        return self.quantization.weight_format

    @property
    def method(self) -> str:
        return self.quantization.method_name

    @property
    def block_size(self) -> int | None:
        return self.quantization.block_size

    @property
    def smoothquant_alpha(self) -> float | None:
        return self.quantization.smoothquant_alpha

    @property
    def act_format(self) -> str | None:
        return self.quantization.act_format

    @property
    def seq_len(self) -> int:
        return self.evaluation.seq_len

    @property
    def eval_max_windows(self) -> int | None:
        """Deprecated: ``evaluation.max_windows`` (``to_dict()["eval_max_windows"]`` for the store column)."""
        _deprecated("RunSpec.eval_max_windows", "read spec.evaluation.max_windows")
        return self.evaluation.max_windows

    @cached_property
    def label(self) -> str:
        """The recipe label (:attr:`quantpredict.recipe.Recipe.label`)."""
        return self.quantization.label

    @cached_property
    def key(self) -> str:
        """The run key (see :func:`run_key`)."""
        return run_key(self.model_id, self.label, self.code_version, self.evaluation)

    def recipe_fields(self) -> dict:
        """The recipe's run-store columns as a dict (``None`` for defaults)."""
        return self.quantization.columns()

    def recipe(self) -> Recipe:
        """The :class:`~quantpredict.recipe.Recipe` of this run."""
        return self.quantization

    def to_dict(self) -> dict:
        """The spec's run-store columns (what :meth:`from_columns` reads back)."""
        return {"model": self.model, **self.recipe_fields(),
                **{c: getattr(self.evaluation, f) for f, c in EVAL_COLUMNS.items()},
                "model_id": self.model_id, "code_version": self.code_version,
                "recipe": self.label, "recipe_json": self.quantization.to_json(), "run_key": self.key}

    def __reduce__(self):  # init=False: pickle through the constructor
        return (_rebuild, (self.model, self.quantization, self.evaluation, self.model_id, self.code_version))


def _rebuild(model: str, recipe: Recipe, evaluation: EvalSetting, model_id: str, code_version: str) -> RunSpec:
    return RunSpec(model, recipe, evaluation, model_id=model_id, code_version=code_version)


def _none_or(value, cast):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "default", "-")):
        return None
    return cast(value)


#: ``plan_runs``' grid keywords before it took a :class:`SweepGrid` (deprecated), with their defaults.
_LEGACY_AXES = {"formats": (), "methods": (), "smoothquant": (None,), "act_formats": (None,), "block_sizes": (None,),
                "block_size_formats": None, "recipes": ()}


def plan_runs(grid: SweepGrid | Sequence[str] | None = None, *axes: Sequence[str],
              evaluation: EvalSetting | None = None, model_ids: Mapping[str, str] | None = None,
              bos: Mapping[str, bool] | None = None,
              model_recipes: Mapping[str, Sequence[Recipe | str]] | None = None,
              code_version: str = CODE_VERSION, **legacy: Any) -> list[RunSpec]:
    """The run specs of ``grid`` (a :class:`SweepGrid`: ``models x formats x block_sizes x methods x smoothquant x
    act_formats``, plus every model x each of its explicit ``recipes``), plus the recipes ``model_recipes`` lists
    for one model (named mixes resolved for that model's layers), evaluated as ``evaluation`` says (default
    ``EvalSetting()``).

    A pure function: the order is the nested-loop order of the axes (models outermost, so a model's runs are
    adjacent), duplicates are dropped keeping the first. ``None`` (or the strings ``"none"``/``"default"``) in
    ``block_sizes``, ``smoothquant`` and ``act_formats`` mean the format's default block, no SmoothQuant and
    weight-only quantization. ``methods`` may hold ``rtn``, ``gptq`` and the QAT methods ``qat``/``qat_gptq``.
    ``model_ids`` maps a model to its identified name (with weights hash); ``bos`` maps a model to its BOS protocol
    (:func:`quantpredict.data.eval_protocol`; absent: ``evaluation.bos``). Named mixes among the grid's recipes are
    planned only as ``model_recipes`` gives them resolved (:meth:`SweepGrid.plan` resolves them). An invalid recipe
    (unknown format or method, alpha out of range) raises :class:`~quantpredict.errors.RecipeError` before anything
    runs.

    Deprecated form: ``plan_runs(models, formats, methods, smoothquant=..., seq_len=..., eval_max_windows=...,
    eval_text=<sha256 prefix>, ...)``, the grid's axes and the evaluation columns as loose arguments (still planned
    exactly as before, with a ``DeprecationWarning``).
    """
    if grid is None and "models" in legacy:
        grid = legacy.pop("models")
    if isinstance(grid, SweepGrid):
        if axes or legacy:
            raise TypeError(f"plan_runs(grid, ...) got grid axes too ({', '.join(legacy) or 'positional'}); put "
                            "them in the grid (dataclasses.replace(grid, ...))")
        from quantpredict.mixes import split_specs

        axes_of = grid
        explicit = split_specs(list(grid.recipes))[0]
    else:
        axes_of, explicit, evaluation = _legacy_grid(grid, axes, legacy, evaluation)
    return _plan(axes_of, explicit, evaluation if evaluation is not None else EvalSetting(), model_ids=model_ids,
                 bos=bos, model_recipes=model_recipes, code_version=code_version)


def _legacy_grid(models, axes, legacy, evaluation):
    """The deprecated loose form of :func:`plan_runs`: its axes as a namespace, its recipes and its setting."""
    import types

    if len(axes) > 2:
        raise TypeError(f"plan_runs() takes at most 3 positional arguments in its deprecated form ({1 + len(axes)} "
                        "given)")
    values = dict(_LEGACY_AXES) | dict(zip(("formats", "methods"), axes))
    evaluation_columns = {k: legacy.pop(k) for k in ("seq_len", "eval_max_windows", "eval_text") if k in legacy}
    for k in legacy:
        if k not in _LEGACY_AXES or k in dict(zip(("formats", "methods"), axes)):
            raise TypeError(f"plan_runs() got an unexpected keyword argument {k!r}")
    values |= legacy
    _deprecated("plan_runs(models, formats, methods, ...)",
                "use plan_runs(SweepGrid(models, formats, methods, ...), evaluation=EvalSetting(...)) or "
                "SweepGrid.plan")
    if evaluation is None:
        evaluation = _setting_of_columns({"seq_len": evaluation_columns.get("seq_len", 256),
                                          "eval_max_windows": evaluation_columns.get("eval_max_windows"),
                                          "eval_text": evaluation_columns.get("eval_text")})
    return types.SimpleNamespace(models=models, **values), list(values["recipes"]), evaluation


def _plan(grid, explicit: Sequence[Recipe | str], evaluation: EvalSetting, *, model_ids, bos, model_recipes,
          code_version: str) -> list[RunSpec]:
    """:func:`plan_runs` of the grid's axes (a :class:`SweepGrid` or the deprecated form's namespace)."""
    from quantpredict.errors import RecipeError

    models, formats, methods = grid.models, grid.formats, grid.methods
    per_model = {m: [Recipe.coerce(r) for r in rs] for m, rs in (model_recipes or {}).items()}
    if not models or not ((formats and methods) or explicit or any(per_model.values())):
        raise RecipeError("plan_runs needs at least one model and either one format and one method or one recipe")
    unknown = [m for m in methods if str(m) not in METHOD_NAMES]
    if unknown:
        raise RecipeError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHOD_NAMES)}")
    bss = [_none_or(b, int) for b in grid.block_sizes] or [None]
    sqs = [_none_or(a, float) for a in grid.smoothquant] or [None]
    acts = [_none_or(a, str) for a in grid.act_formats] or [None]
    ids = dict(model_ids or {})
    prefixes = tuple(grid.block_size_formats) if grid.block_size_formats is not None else None

    def sizes(fmt: str) -> list[int | None]:
        return bss if prefixes is None or str(fmt).startswith(prefixes) else [None]

    recipes = [make_recipe(str(f), b, str(meth), sq, a) for f in formats for b in sizes(f)
               for meth, sq, a in itertools.product(methods, sqs, acts)]
    recipes += [Recipe.coerce(r) for r in explicit]
    seen: set[str] = set()
    out: list[RunSpec] = []
    for model in models:
        setting = replace(evaluation, bos=bool((bos or {}).get(model, evaluation.bos)))
        for recipe in [*recipes, *per_model.get(model, ())]:
            spec = RunSpec(str(model), recipe, setting, model_id=ids.get(model, str(model)),
                           code_version=code_version)
            if spec.key not in seen:
                seen.add(spec.key)
                out.append(spec)
    return out


def split_values(values) -> list:
    """A sweep axis as a list: lists, tuples or comma-separated strings (as the CLI passes them); ``None`` is
    ``[None]`` (the axis' default alone)."""
    if values is None:
        return [None]
    if isinstance(values, (str, int, float)):
        values = [values]
    out: list = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip()) if isinstance(v, str) else out.append(v)
    return out


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep runs: ``models x formats x block_sizes x methods x smoothquant x act_formats``, plus every model
    x each of ``recipes`` (explicit recipes, labels, or named mixes such as ``q4_k_m`` resolved per model).

    The axes are those of :func:`plan_runs` (and :func:`quantpredict.runs.collect`), normalised when built: each
    becomes a tuple, a comma-separated string is split (``"int4,int8"``), ``None`` entries of ``formats`` and
    ``methods`` are dropped. A grid without a model, or with neither a format and a method nor a recipe, raises
    :class:`~quantpredict.errors.RecipeError`. How the runs are evaluated is not part of the grid:
    :meth:`plan` takes the :class:`~quantpredict.recipe.EvalSetting`.
    """

    models: tuple[str, ...]
    formats: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    smoothquant: tuple[float | None, ...] = (None,)
    act_formats: tuple[str | None, ...] = (None,)
    block_sizes: tuple[int | None, ...] = (None,)
    block_size_formats: tuple[str, ...] | None = None
    recipes: tuple = ()

    def __post_init__(self) -> None:
        from quantpredict.errors import RecipeError

        axes = {
            "models": tuple(split_values(self.models)),
            "formats": tuple(f for f in split_values(self.formats) if f is not None),
            "methods": tuple(m for m in split_values(self.methods) if m is not None),
            "smoothquant": tuple(split_values(self.smoothquant)),
            "act_formats": tuple(split_values(self.act_formats)),
            "block_sizes": tuple(split_values(self.block_sizes)),
            "block_size_formats": None if self.block_size_formats is None else tuple(self.block_size_formats),
            "recipes": tuple(self.recipes),
        }
        for name, value in axes.items():
            object.__setattr__(self, name, value)
        if not self.models or self.models == (None,) or not ((self.formats and self.methods) or self.recipes):
            raise RecipeError("a sweep needs at least one model and either one format and one method, or one "
                              "explicit recipe")

    def model_recipes(self) -> dict[str, list[Recipe]]:
        """``{model: [recipe of each named mix]}`` of the named mixes in ``recipes`` (``{}`` without one): a mix is
        resolved for each model's layers, read from its module tree (:func:`quantpredict.models.resolve_for_models`,
        which imports torch)."""
        from quantpredict.mixes import split_specs

        mixes = split_specs(list(self.recipes))[1]
        if not mixes:
            return {}
        from quantpredict.models import resolve_for_models

        return resolve_for_models(list(self.models), mixes)

    def plan(self, evaluation: EvalSetting | None = None, *, model_ids: Mapping[str, str] | None = None,
             bos: Mapping[str, bool] | None = None, model_recipes: Mapping[str, Sequence[Recipe | str]] | None = None,
             code_version: str = CODE_VERSION) -> list[RunSpec]:
        """The grid's run specs, :func:`plan_runs` of its axes, evaluated as ``evaluation`` says (default
        ``EvalSetting()``: 256-token windows, the whole test split); ``model_ids`` / ``bos`` as in
        :func:`plan_runs`. ``model_recipes``: the named mixes already resolved per model (default:
        :meth:`model_recipes`)."""
        if model_recipes is None:
            model_recipes = self.model_recipes()
        return plan_runs(self, evaluation=evaluation, model_ids=model_ids, bos=bos, model_recipes=model_recipes,
                         code_version=code_version)
