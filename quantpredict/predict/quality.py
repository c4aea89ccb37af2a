"""``predict_quality``: a model and a recipe in, the predicted KLD, delta NLL, top-1 agreement and WikiText-2
perplexity with intervals out (delta NLL and perplexity alone from a delta-only kind), without evaluating the model.

By default the recipe is priced from the weights against the model's cached sensitivity profile
(:func:`quantpredict.predict.rank.price`, the path ``rank`` and ``allocate`` use, so the three agree on every
recipe). A saved predictor of another kind (``"physics"``: the shipped measurement predictor) computes its features
on the fly on WikiText-2 *train* calibration data instead: for ``physics``, a quantization of the model and forward
passes over the calibration windows per recipe. Recipes the weights-only path does not price yet (QAT, and AWQ
with activation quantization or SmoothQuant) are measured that way, and the :class:`Prediction` says so in ``how``
and ``note``; weight+activation recipes (SmoothQuant, activation formats) are priced from the weights with the
activation term (:mod:`quantpredict.features.act_price`), AWQ recipes with the search run on the profile's
statistics (:mod:`quantpredict.features.awq_price`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError, RecipeError
from quantpredict.predict.saved import SavedPredictor
from quantpredict.predict.shipped import (  # noqa: F401 -- re-exported: the API names them here
    DEFAULT_PREDICTOR_DIR,
    PHYSICS_PREDICTOR_DIR,
    PROFILE_PREDICTOR_DIR,
    resolve_predictor,
)
from quantpredict.recipe import RECIPE_COLUMNS, Recipe
from quantpredict.schema import FEATURE_NAMES, TIMING_NAMES

#: how each path reaches its answer (``Prediction.how``)
HOW_PROFILE = "priced from the weights against the model's profile"
HOW_MEASURED = "measured on the calibration windows"
RECIPE_FIELDS = RECIPE_COLUMNS  # the run-store columns of a recipe (quantpredict.recipe)


@dataclass(frozen=True)
class Prediction:
    """One recipe's prediction. Perplexities on WikiText-2 test; ``delta_*`` in nats; ``*_low``/``*_high`` bound
    the predictor's (1 - alpha) interval (90% by default). ``kld`` (mean KL(P_fp || P_q), nats) and ``top1`` (top-1
    agreement, a fraction) with their intervals come from the KLD-first kinds (``physics``, ``profile``); NaN from the
    delta-only kinds. ``ppl_fp``: the FP reference (:func:`~quantpredict.predict.fp_reference.resolve_fp_reference`)
    with ``ppl_fp_se`` (NaN: not known); ``ppl_fp_source``: ``"zoo card"``, ``"cache"``, ``"measured"``,
    ``"--ppl-fp"`` (given) or ``"predicted"`` (from the calibration NLL, on request); ``fp_reference``: all of it
    (:class:`~quantpredict.predict.fp_reference.FPReference` as a dict). ``ppl_low``/``ppl_high`` combine the delta
    interval with the FP NLL's SE. ``ppl_increase_pct``: ``100 (ppl / ppl_fp - 1)``. ``seconds``: features +
    prediction (what replaces the evaluation); ``load_seconds``: loading the model, which an evaluation pays too;
    ``full_eval_seconds``: the shared estimate of a full WikiText-2 test evaluation of the recipe
    (:func:`~quantpredict.predict.fp_reference.full_eval_cost`, ``full_eval_how`` says how); ``eval_seconds``: what a
    full evaluation of this model cost in the predictor's training runs (None for a model it has not seen).
    ``how``: :data:`HOW_PROFILE` (weights-only, the default) or :data:`HOW_MEASURED` (a measurement predictor such as
    ``physics``: the recipe was quantized and run on calibration windows); ``note``: why a recipe was measured
    although the weights-only predictor was asked for (empty otherwise); ``runtime``: the runtime it was priced as
    running on (``"llama.cpp-cpu"``: its activation rounding included), ``None`` for the project's own model. On
    the weights-only path ``seconds`` is the recipe's pricing alone, plus the profile's measurement when this call
    measured it."""

    model: str
    recipe: str
    ppl: float
    ppl_low: float
    ppl_high: float
    delta_nll: float
    delta_low: float
    delta_high: float
    ppl_fp: float
    ppl_fp_source: str
    seconds: float
    load_seconds: float = 0.0
    predictor_kind: str = ""
    eval_seconds: float | None = None  # a full evaluation's seconds for this model, when the training runs hold it
    features: dict[str, float] = field(default_factory=dict)
    feature_seconds: dict[str, float] = field(default_factory=dict)
    kld: float = float("nan")
    kld_low: float = float("nan")
    kld_high: float = float("nan")
    top1: float = float("nan")
    top1_low: float = float("nan")
    top1_high: float = float("nan")
    ppl_fp_se: float = float("nan")
    ppl_increase_pct: float = float("nan")
    out_of_range: str = ""
    full_eval_seconds: float | None = None
    full_eval_how: str = ""
    fp_reference: dict[str, Any] = field(default_factory=dict)
    how: str = ""
    note: str = ""
    runtime: str | None = None  # the runtime the recipe was priced for (quantpredict.runtime); None: the project's
    imatrix: str | None = None  # the imatrix the RTN was priced with (its file's name and sha256 prefix); None: none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_columns(recipe: Any) -> tuple[str, dict[str, Any]]:
    """The recipe's label and its run-store columns (``weight_format``, ``block_size``, ``method``, ...).

    ``recipe``: a :class:`~quantpredict.recipe.Recipe`, a label (``"mxint4-gptq"``) or a dict of Recipe fields;
    anything else, or a dict with unknown fields, raises :class:`~quantpredict.errors.RecipeError`.
    """
    r = Recipe.coerce(recipe)
    cols = r.columns()
    cols["smoothquant_alpha"] = np.nan if cols["smoothquant_alpha"] is None else float(cols["smoothquant_alpha"])
    return r.label, cols


def predict_quality(model_or_path: Any, recipe: Any, predictor: str | Path | SavedPredictor = "default", *,
                    tokenizer: Any = None, calib_ids: Any = None, ppl_fp: Any = None, fp_windows: int | None = None,
                    seed: int = 0, extract_options: Mapping[str, Any] | None = None,
                    model_name: str | None = None, device: Any = None, profile: Any = None,
                    cache: bool = True, runtime: str | None = None, imatrix: Any = None) -> Prediction:
    """Predict the quality of ``model_or_path`` quantized with ``recipe`` (see :class:`Prediction`), without
    evaluating it.

    ``model_or_path``: a zoo name or HF directory (loaded with ``quantpredict.models.load``), or a loaded model (then
    pass ``tokenizer`` or ``calib_ids``). ``recipe``: a :class:`~quantpredict.recipe.Recipe`, its label or a dict of
    its fields. ``predictor``: ``"default"`` (the shipped weights-only ``profile`` predictor: the recipe is priced
    from the weights against the model's cached profile, :func:`~quantpredict.predict.rank.price`, exactly as
    ``rank`` and ``allocate`` price it), ``"physics"`` (the shipped measurement predictor: the recipe is quantized and
    run on the calibration windows), a saved predictor directory, or a fitted predictor. With a ``profile``
    predictor, a recipe the weights-only path does not price (QAT, AWQ with activation quantization) is
    measured by the ``physics`` predictor, and ``Prediction.note`` says so. ``calib_ids``: calibration token ids
    (default: WikiText-2 train through the model's tokenizer).
    ``ppl_fp``: the FP reference (:func:`~quantpredict.predict.fp_reference.resolve_fp_reference`): ``None`` (the
    zoo card, else the cached measurement, else measured now on ``fp_windows`` WikiText-2 test windows and cached),
    a measured number, ``"predicted"`` or an ``FPReference``. A measurement predictor computes only the feature
    groups it uses (``features.extract(..., which=groups)``); ``extract_options`` overrides
    ``features.ExtractOptions`` fields (keep the defaults the training runs used).
    ``model_name``: the name to report (and to look up the training runs' evaluation seconds) for a model object.
    ``device``: where a measurement predictor's features are computed (``"cuda"``; default: where the model is, CPU
    for a name); a model object is moved there for the call and back. Memory: ``extract_options={"max_memory":
    ...}`` (default 2 GiB of working memory beyond the weights and the quantization direction). ``profile``: a
    :class:`~quantpredict.predict.rank.ModelProfile` already measured (:func:`~quantpredict.predict.rank.
    profile_model`), so that several recipes share it; ``cache``: read and write the profile cache and the FP
    reference's. ``runtime`` (``"llama.cpp-cpu"``): price the recipe as that runtime runs it, its activation
    rounding included (:func:`~quantpredict.predict.rank.recipe_row`); the weights-only path only (a
    :class:`PredictorError` for a measurement predictor or a recipe it would measure). ``imatrix`` (an
    :class:`~quantpredict.imatrix.Imatrix` or a llama.cpp imatrix file): price the recipe's RTN of llama.cpp types
    as llama-quantize --imatrix quantizes it (weights-only path, RTN recipes of llama.cpp types only; the file is
    read before the model loads); ``Prediction.imatrix`` names it.

    Fourteen parameters, on purpose: past the model, the recipe and the predictor, each keyword is an independent
    input of one of the two paths (calibration data, the FP reference and its window count, the seed, the
    measurement's options, a display name, a device, a measured profile, the cache, the runtime), and no frozen
    config groups them.
    """
    from quantpredict.memory import resolve_device

    if device is not None:
        device = resolve_device(device, flag="device")  # before any loading
    from quantpredict.predict.fp_reference import check_fp_windows, check_ppl_fp
    from quantpredict.predict.rank import weights_only

    pred = resolve_predictor(predictor)
    if ppl_fp is not None and not hasattr(ppl_fp, "columns"):
        check_ppl_fp(ppl_fp, "ppl_fp")
    if fp_windows is not None:
        check_fp_windows(fp_windows, "fp_windows")
    label, cols = recipe_columns(recipe)
    recipe = Recipe.coerce(recipe) if not isinstance(recipe, Recipe) else recipe
    note = ""
    matrices = recipe.embedding_format is not None or recipe.head_format is not None
    if matrices and not weights_only(recipe):
        raise RecipeError(f"{label}: a recipe that quantizes the token embedding or the head (E=/H=) is priced on "
                          "the weights-only path, which does not price QAT or AWQ with activation quantization; drop "
                          "E=/H= to predict the linear layers by measurement, or measure the recipe "
                          "(`quantpredict collect`)")
    if pred.kind == "profile" and not weights_only(recipe):
        pred = resolve_predictor("physics")
        note = (f"{label}: the weights-only profile does not price QAT, or AWQ with activation quantization; "
                f"measured on the calibration windows instead ({pred.kind} predictor: a quantization and forward "
                f"passes)")
    elif pred.kind != "profile" and matrices:
        # the measured features perturb the linear layers only: the embedding and head terms are the profile's
        asked, pred = pred.kind, resolve_predictor(PROFILE_PREDICTOR_DIR)
        note = (f"{label}: the token embedding and head (E=/H=) are priced from the weights by the shipped profile "
                f"predictor (the {asked} predictor's measured features perturb the linear layers only)")
    if runtime is not None and pred.kind != "profile":
        raise PredictorError(f"{label}: a runtime ({runtime}) is priced on the weights-only path, with the "
                             f"'profile' predictor; the {pred.kind} predictor measures the project's own model"
                             + (f" ({note})" if note else ""))
    if imatrix is not None:
        from quantpredict.imatrix import check_imatrix_recipe, load

        if pred.kind != "profile":
            raise PredictorError(f"{label}: an imatrix is priced on the weights-only path, with the 'profile' "
                                 f"predictor; the {pred.kind} predictor measures the project's own model"
                                 + (f" ({note})" if note else ""))
        check_imatrix_recipe(recipe)
        load(imatrix)  # a missing or malformed file fails before the model loads
    if pred.kind == "profile":
        return _from_profile(model_or_path, recipe, pred, tokenizer=tokenizer, calib=calib_ids, ppl_fp=ppl_fp,
                             fp_windows=fp_windows, seed=seed, name=model_name, device=device, profile=profile,
                             cache=cache, runtime=runtime, imatrix=imatrix, note=note)
    t_load = time.perf_counter()
    if isinstance(model_or_path, (str, Path)):
        from quantpredict import models

        # eager attention: second derivatives (curvature, landscape features) fail through CPU SDPA. The
        # checkpoint's own dtype: a bf16 one stays bf16 until the features upcast it (same values as a float32 load)
        model, tok = models.load(str(model_or_path), attn_implementation="eager", device=device, dtype="auto")
        tokenizer = tokenizer or tok
        name = str(model_or_path)
    else:
        model = model_or_path
        name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    load_seconds = time.perf_counter() - t_load
    name = model_name or name

    t0 = time.perf_counter()
    if calib_ids is None:
        if tokenizer is None:
            raise PredictorError("predict_quality got a model object without a tokenizer: pass tokenizer= (or "
                                 "calib_ids=), or pass the model's name/path instead")
        from quantpredict import data

        calib_ids = data.token_stream(tokenizer, "wikitext2", "train")
    from quantpredict import features as features_mod

    raw = dict(features_mod.extract(model, recipe, calib_ids, seed=seed, which=list(pred.required_groups),
                                    device=device, **dict(extract_options or {})))
    # features last: the store's `block_size` column holds the resolved block size (a feature), never the recipe's None
    row: dict[str, Any] = {**cols, **raw, "model": name, "recipe": label}  # the label: its method class
    try:
        from quantpredict import arch

        row["family"] = arch.family(model)
    except Exception:  # noqa: BLE001 -- the family is informative only; the predictor does not use it
        row["family"] = None
    from quantpredict.predict.fp_reference import label_output, resolve_fp_reference

    t_fp = time.perf_counter()
    ref = resolve_fp_reference(model_or_path if isinstance(model_or_path, (str, Path)) else model, model=model,
                               tokenizer=tokenizer, ppl_fp=ppl_fp, fp_windows=fp_windows, name=model_name,
                               flag="ppl_fp", cache=cache)
    fp_seconds = time.perf_counter() - t_fp  # an FP measurement is not what replaces the evaluation
    row.update(ref.columns())
    frame = pred.predict(pd.DataFrame([row]))
    label_output(frame, ref)
    out = frame.iloc[0]
    return _prediction(name, label, out, raw, ref, pred, seconds=time.perf_counter() - t0 - fp_seconds,
                       load_seconds=load_seconds, how=HOW_MEASURED, note=note)


def _from_profile(model_or_path: Any, recipe: Recipe, pred: SavedPredictor, *, tokenizer, calib, ppl_fp,
                  fp_windows, seed, name, device, profile, cache, runtime=None, imatrix=None,
                  note: str = "") -> Prediction:
    """The weights-only path: the model's profile (given, cached or measured now), then
    :func:`~quantpredict.predict.rank.price` of the recipe."""
    from quantpredict.predict.rank import fp_reference_of, price, profile_model

    t0 = time.perf_counter()
    load_seconds = 0.0
    if profile is None:
        if isinstance(model_or_path, (str, Path)) and device is not None and device.type != "cpu":
            from quantpredict import models

            model_or_path, tok = models.load(str(model_or_path), attn_implementation="eager", device=device)
            tokenizer = tokenizer or tok
            load_seconds = time.perf_counter() - t0
        profile = profile_model(model_or_path, tokenizer=tokenizer, calib=calib, seed=seed, name=name, cache=cache)
    measured = time.perf_counter() - t0 - load_seconds  # the profile, when this call measured or read it
    ref = fp_reference_of(profile, ppl_fp, fp_windows, cache)
    from quantpredict.mixes import resolve_recipe

    priced = price(profile, [resolve_recipe(recipe, profile.model)], pred, ref, runtime=runtime, imatrix=imatrix)
    out = priced.iloc[0]
    seconds = float(out["price_seconds"]) + measured
    return _prediction(name or profile.name, recipe.label, out, out.to_dict(), ref, pred, seconds=seconds,
                       load_seconds=load_seconds, how=HOW_PROFILE, note=note, runtime=runtime,
                       imatrix=priced.attrs.get("imatrix"))


def _prediction(name: str, label: str, out: Any, raw: Mapping[str, Any], ref: Any, pred: SavedPredictor, *,
                seconds: float, load_seconds: float, how: str, note: str, runtime: str | None = None,
                imatrix: str | None = None) -> Prediction:
    """A :class:`Prediction` from the predictor's output row ``out`` and the features ``raw`` it read."""
    from quantpredict.predict.fp_reference import full_eval_cost

    cost = full_eval_cost(ref)
    extra = {k: float(out[k]) for k in ("kld", "kld_low", "kld_high", "top1", "top1_low", "top1_high") if k in out}
    feats = {k: float(raw[k]) for k in FEATURE_NAMES if k in raw and _is_number(raw[k])}
    timings = {k: float(raw[k]) for k in TIMING_NAMES if k in raw and _is_number(raw[k])}
    return Prediction(model=name, recipe=label, ppl=float(out["ppl"]), ppl_low=float(out["ppl_low"]),
                      ppl_high=float(out["ppl_high"]), delta_nll=float(out["delta_nll"]),
                      delta_low=float(out["delta_low"]), delta_high=float(out["delta_high"]),
                      ppl_fp=float(out["ppl_fp"]), ppl_fp_source=str(out["ppl_fp_source"]), seconds=seconds,
                      load_seconds=load_seconds, predictor_kind=pred.kind,
                      eval_seconds=(pred.metadata.get("eval_seconds_by_model") or {}).get(name),
                      features=feats, feature_seconds=timings, ppl_fp_se=float(out["ppl_fp"]) * ref.nll_se,
                      ppl_increase_pct=float(out["ppl_increase_pct"]), out_of_range=str(out.get("out_of_range") or ""),
                      full_eval_seconds=cost.seconds, full_eval_how=cost.how, fp_reference=ref.to_dict(), how=how,
                      note=note, runtime=runtime, imatrix=imatrix, **extra)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
