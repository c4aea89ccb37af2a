"""Sweep planning: one :class:`RunSpec` per (model, recipe, evaluation setting), and the run key that names it.

Planning is a pure function of its arguments so that a resumed sweep plans exactly the same grid and skips the
keys the store already holds. Nothing here imports torch: a recipe and its label come from the torch-free
:mod:`quantpredict.recipe`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from quantpredict.recipe import CODE_VERSION, METHOD_NAMES, RECIPE_COLUMNS, EvalSetting, Recipe

RECIPE_FIELDS = RECIPE_COLUMNS  # the name this module always exported

__all__ = ["CODE_VERSION", "RECIPE_FIELDS", "RunSpec", "SweepGrid", "eval_label", "evaluation_setting", "plan_runs",
           "recipe_label", "run_key", "split_values"]


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


def eval_label(seq_len: int, eval_max_windows: int | None, *, bos: bool = False, text: str | None = None) -> str:
    """The evaluation setting part of a run key: ``seq256-w256`` (``wall`` for the whole test split); see
    :class:`~quantpredict.recipe.EvalSetting`."""
    return evaluation_setting(seq_len, eval_max_windows, bos=bos, text=text).label


def evaluation_setting(seq_len: int = 256, eval_max_windows: int | None = None, *, bos: bool = False,
                       text: str | None = None) -> EvalSetting:
    """The :class:`~quantpredict.recipe.EvalSetting` of the loose arguments sweeps and run specs take (``seq_len``
    and ``eval_max_windows`` cast to ``int``, as the CLI may pass other numbers)."""
    return EvalSetting(int(seq_len), None if eval_max_windows is None else int(eval_max_windows), bool(bos), text)


def run_key(model_id: str, recipe: str, code_version: str = CODE_VERSION, *, seq_len: int = 256,
            eval_max_windows: int | None = None, evaluation: EvalSetting | None = None) -> str:
    """The store's primary key: ``model_id|recipe label|code version|evaluation setting``.

    ``model_id`` should carry the weights hash (``name@1a2b3c4d5e6f``, see :func:`quantpredict.runs.model_id`)
    so that retraining a zoo model under the same name yields new keys instead of silently reusing stale runs.
    The evaluation setting is part of the key because measuring on a different number of test windows (or with
    another protocol) is a different measurement; ``evaluation`` takes precedence over ``seq_len`` and
    ``eval_max_windows``.
    """
    for name, value in (("model_id", model_id), ("recipe", recipe), ("code_version", code_version)):
        if not value or "|" in str(value):
            raise ValueError(f"run_key: {name} must be a non-empty string without '|', got {value!r}")
    setting = evaluation if evaluation is not None else EvalSetting(int(seq_len), eval_max_windows)
    return "|".join((str(model_id), str(recipe), str(code_version), setting.label))


@dataclass(frozen=True, init=False)
class RunSpec:
    """One run of a sweep: a model, a :class:`~quantpredict.recipe.Recipe` (``quantization``) and how it is evaluated
    (``evaluation``, an :class:`~quantpredict.recipe.EvalSetting`). Picklable, so it travels to Dask workers.

    ``model`` is what :func:`quantpredict.models.load` takes (zoo name or path); ``model_id`` is the name plus the
    weights hash (equal to ``model`` when the caller did not identify the weights).

    Built either from a recipe, ``RunSpec("llama-s", Recipe("mxint4", method="gptq"), EvalSetting(256, 256))``, or
    from run-store columns, ``RunSpec("llama-s", "mxint4", "gptq", block_size=128, eval_max_windows=256)``.
    """

    model: str
    quantization: Recipe
    evaluation: EvalSetting
    model_id: str
    code_version: str

    def __init__(self, model: str, weight_format: str | Recipe, method: str | EvalSetting | None = None,
                 block_size: int | None = None, smoothquant_alpha: float | None = None,
                 act_format: str | None = None, seq_len: int = 256, eval_max_windows: int | None = None,
                 model_id: str = "", code_version: str = CODE_VERSION, *, evaluation: EvalSetting | None = None,
                 bos: bool = False, eval_text: str | None = None) -> None:
        if isinstance(weight_format, Recipe):
            recipe = weight_format
            if isinstance(method, EvalSetting):
                evaluation = method
        else:
            recipe = make_recipe(weight_format, block_size, method or "rtn", smoothquant_alpha, act_format)
        if evaluation is None:
            evaluation = evaluation_setting(seq_len, eval_max_windows, bos=bos, text=eval_text)
        object.__setattr__(self, "model", str(model))
        object.__setattr__(self, "quantization", recipe)
        object.__setattr__(self, "evaluation", evaluation)
        object.__setattr__(self, "model_id", model_id or str(model))
        object.__setattr__(self, "code_version", code_version)

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
        return self.evaluation.max_windows

    @cached_property
    def label(self) -> str:
        """The recipe label (:attr:`quantpredict.recipe.Recipe.label`)."""
        return self.quantization.label

    @cached_property
    def key(self) -> str:
        """The run key (see :func:`run_key`)."""
        return run_key(self.model_id, self.label, self.code_version, evaluation=self.evaluation)

    def recipe_fields(self) -> dict:
        """The recipe's run-store columns as a dict (``None`` for defaults)."""
        return self.quantization.columns()

    def recipe(self) -> Recipe:
        """The :class:`~quantpredict.recipe.Recipe` of this run."""
        return self.quantization

    def to_dict(self) -> dict:
        return {"model": self.model, **self.recipe_fields(), "seq_len": self.seq_len,
                "eval_max_windows": self.eval_max_windows, "eval_bos": self.evaluation.bos,
                "eval_text": self.evaluation.text, "model_id": self.model_id, "code_version": self.code_version,
                "recipe": self.label, "recipe_json": self.quantization.to_json(), "run_key": self.key}

    def __reduce__(self):  # init=False: pickle through the constructor
        return (_rebuild, (self.model, self.quantization, self.evaluation, self.model_id, self.code_version))


def _rebuild(model: str, recipe: Recipe, evaluation: EvalSetting, model_id: str, code_version: str) -> RunSpec:
    return RunSpec(model, recipe, evaluation, model_id=model_id, code_version=code_version)


def _none_or(value, cast):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "default", "-")):
        return None
    return cast(value)


def plan_runs(models: Sequence[str], formats: Sequence[str] = (), methods: Sequence[str] = (), *,
              smoothquant: Iterable[float | None] = (None,), act_formats: Iterable[str | None] = (None,),
              block_sizes: Iterable[int | None] = (None,), seq_len: int = 256, eval_max_windows: int | None = None,
              model_ids: Mapping[str, str] | None = None, code_version: str = CODE_VERSION,
              block_size_formats: Sequence[str] | None = None, recipes: Sequence[Recipe | str] = (),
              bos: Mapping[str, bool] | None = None, eval_text: str | None = None,
              model_recipes: Mapping[str, Sequence[Recipe | str]] | None = None,
              evaluation: EvalSetting | None = None) -> list[RunSpec]:
    """The full grid ``models x formats x block_sizes x methods x smoothquant x act_formats`` as run specs, plus
    every model x each of ``recipes`` (explicit recipes or labels: mixed-precision allocations), plus the recipes
    ``model_recipes`` lists for one model (named mixes resolved for that model's layers).

    A pure function: the order is the nested-loop order of the arguments (models outermost, so a model's runs are
    adjacent), duplicates are dropped keeping the first. ``None`` (or the strings ``"none"``/``"default"``) in
    ``block_sizes``, ``smoothquant`` and ``act_formats`` mean the format's default block, no SmoothQuant and
    weight-only quantization. ``methods`` may hold ``rtn``, ``gptq`` and the QAT methods ``qat``/``qat_gptq``.
    ``model_ids`` maps a model to its identified name (with weights hash); ``bos`` maps a model to its BOS protocol
    (:func:`quantpredict.data.eval_protocol`; absent: no BOS); ``eval_text`` is the sha256 prefix of a user's
    evaluation text; ``evaluation`` (an :class:`~quantpredict.recipe.EvalSetting`) takes precedence over ``seq_len``,
    ``eval_max_windows`` and ``eval_text``, its ``bos`` being the default of the models ``bos`` does not map. Block
    sizes apply to every format, or, with ``block_size_formats`` (name prefixes such as
    ``("mx",)``), only to the formats starting with one of them; the others get their default (``None``) alone.
    An invalid recipe (unknown format or method, alpha out of range) raises
    :class:`~quantpredict.errors.RecipeError` before anything runs.
    """
    from quantpredict.errors import RecipeError

    per_model = {m: [Recipe.coerce(r) for r in rs] for m, rs in (model_recipes or {}).items()}
    if not models or not ((formats and methods) or recipes or any(per_model.values())):
        raise RecipeError("plan_runs needs at least one model and either one format and one method or one recipe")
    unknown = [m for m in methods if str(m) not in METHOD_NAMES]
    if unknown:
        raise RecipeError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHOD_NAMES)}")
    bss = [_none_or(b, int) for b in block_sizes] or [None]
    sqs = [_none_or(a, float) for a in smoothquant] or [None]
    acts = [_none_or(a, str) for a in act_formats] or [None]
    ids = dict(model_ids or {})
    base = evaluation if evaluation is not None else evaluation_setting(seq_len, eval_max_windows, text=eval_text)
    prefixes = tuple(block_size_formats) if block_size_formats is not None else None

    def sizes(fmt: str) -> list[int | None]:
        return bss if prefixes is None or str(fmt).startswith(prefixes) else [None]

    grid = [make_recipe(str(f), b, str(meth), sq, a) for f in formats for b in sizes(f)
            for meth, sq, a in itertools.product(methods, sqs, acts)]
    grid += [Recipe.coerce(r) for r in recipes]
    seen: set[str] = set()
    out: list[RunSpec] = []
    for model in models:
        setting = replace(base, bos=bool((bos or {}).get(model, base.bos)))
        for recipe in [*grid, *per_model.get(model, ())]:
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
        from quantpredict.mixes import split_specs

        if model_recipes is None:
            model_recipes = self.model_recipes()
        return plan_runs(list(self.models), list(self.formats), list(self.methods), smoothquant=self.smoothquant,
                         act_formats=self.act_formats, block_sizes=self.block_sizes, model_ids=model_ids,
                         code_version=code_version, block_size_formats=self.block_size_formats,
                         recipes=split_specs(list(self.recipes))[0], bos=bos, model_recipes=model_recipes,
                         evaluation=evaluation if evaluation is not None else EvalSetting())
