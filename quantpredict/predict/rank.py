"""Rank every candidate recipe in one call: measure the model once, price each recipe from its weights alone.

:func:`rank_recipes` loads the model, measures its :class:`~quantpredict.features.fisher.SensitivityProfile` once
(a forward pass over the calibration windows and a sampled-label backward pass over the first two: per-token layer
inputs and output gradients; cached on disk, :mod:`quantpredict.predict.profile_cache`), then for
each candidate computes every layer's ``Q(W) - W`` (RTN, or GPTQ against the profile's Hessian ``2A``, measured
block by block with forward passes the first time a GPTQ recipe is priced, then cached: GPTQ recipes pay their
per-layer GPTQ, no forward pass), prices it token-wise against the profile (``token_gn_quad``) and lets a
``profile``-kind predictor turn that into KLD, delta NLL, perplexity and top-1 agreement with intervals. No candidate
runs a forward pass over calibration tokens, so the marginal RTN recipe costs a few weight passes.

A recipe that quantizes the token embedding or the head (``E=`` / ``H=``, a named mix's ``-file``) adds their terms
(:mod:`quantpredict.features.embedding_head`, columns ``embedding_quad`` and ``head_quad``) to ``token_gn_quad``; their
statistics are measured on the profile's token windows the first time one is priced, and cached with the profile.

Bits per element count the quantized linear layers at their format's storage (scales included); ``size_bytes``
counts the whole model, what stays in 16 bits (embeddings and the head unless the recipe quantizes them, norms,
biases, layers a recipe leaves unquantized) at 16 bits, named in ``DataFrame.attrs["kept_16bit"]``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError, RecipeError
from quantpredict.imatrix import check_imatrix_recipe  # noqa: F401 (also this module's name for it)
from quantpredict.predict.shipped import PROFILE_PREDICTOR_DIR, resolve_predictor
from quantpredict.recipe import Recipe

#: The shipped sweep's weight formats: the default candidate grid with RTN and GPTQ (28 recipes).
DEFAULT_FORMATS: tuple[str, ...] = (
    "mxint8", "mxint6", "mxint4", "mxint3", "mxint2", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
    "mxfp4_e2m1", "int8", "int4", "int3", "int2",
)
DEFAULT_METHODS: tuple[str, ...] = ("rtn", "gptq")


def default_recipes(formats: Sequence[str] = DEFAULT_FORMATS, methods: Sequence[str] = DEFAULT_METHODS
                    ) -> list[Recipe]:
    return [Recipe(f, method=m) for f in formats for m in methods]


class GPTQHessianWarning(UserWarning):
    """A GPTQ or AWQ recipe calibrated on fewer tokens than its widest quantized layer has inputs: GPTQ fits such a
    rank-deficient Hessian, and the weights-only price, read on tokens of that calibration set, comes out low
    (measured 2.4-2.7x below the KLD on Qwen2.5-Coder-1.5B, whose 8,960-wide down projections met 2,048 tokens:
    reports/gptq_hessian_study.md)."""


def _warn_rank_deficient_gptq(mp: ModelProfile, formats: Sequence[tuple[str, int | None] | None],
                              recipe: Recipe) -> None:
    tokens = mp.calibration_tokens(recipe)
    widest = max((r.in_features for r, fb in zip(mp.refs, formats) if fb is not None), default=0)
    if widest > tokens:
        import warnings

        warnings.warn(f"{mp.name}: {recipe.label} calibrates on {tokens:,} tokens, fewer than the {widest:,} inputs "
                      "of its widest layers: GPTQ fits a rank-deficient Hessian there, and its predicted KLD is "
                      "likely too low (measured 2.4-2.7x below on Qwen2.5-Coder-1.5B with 2,048 tokens: "
                      "reports/gptq_hessian_study.md); calibrate on more windows (-calNxL), or measure the recipe "
                      "(`predict --measure`) before relying on it", GPTQHessianWarning, stacklevel=3)


@dataclass
class ModelProfile:
    """What :func:`rank_recipes` measures once per model: the model, its profile and its model-level features.

    ``cache_dir``: the profile's cache entry (``None`` when not cached); ``cached``: whether it was read from there
    instead of measured. ``calib``: the calibration data given to :func:`profile_model` (token ids, a
    :class:`~quantpredict.data.TokenStream` or ``[n, seq_len]`` windows; ``None``: WikiText-2 train through the
    tokenizer), which :meth:`calibration_hessians` cuts as ``quantize_model`` does."""

    name: str
    model: Any
    profile: Any
    model_features: dict[str, float]
    refs: list
    seconds: float
    forward_seconds_per_window: float
    full_split_windows: int
    cache_dir: Path | None = None
    cached: bool = False
    tokenizer: Any = None
    source: Any = None  # what the model was given as (a name or path, or the model object)
    # (calibration key, layer, percdamp, act_order) -> the layer's GPTQ Hessian factor, kept across recipes
    gptq_factors: dict = field(default_factory=dict)
    windows: Any = None  # () -> the calibration windows [n, seq_len] the profile was measured on
    seed: int = 0
    embedding_head: Any = None  # EmbeddingHeadStats, measured (or read from the cache) when first needed
    calib: Any = None
    calibration_moments: dict = field(default_factory=dict)  # (samples, seq_len, seed) -> input moments

    def calibration_key(self, recipe: Recipe) -> tuple[int, int, int]:
        """``(calib_samples, calib_seq_len, seed)``: what a recipe's calibration windows depend on."""
        return int(recipe.calib_samples), int(recipe.calib_seq_len), int(recipe.seed)

    def calibration_ids(self):
        """What GPTQ and AWQ recipes calibrate on: :attr:`calib`, else WikiText-2 train's token stream (tokenized
        once per process), as ``quantize``, ``collect`` and ``eval`` give ``quantize_model``."""
        if self.calib is not None:
            return self.calib
        if self.tokenizer is None:
            raise PredictorError(f"{self.name}: this profile has neither calibration data nor a tokenizer to measure "
                                 "GPTQ's Hessians on; profile the model with profile_model()")
        from quantpredict import data

        return data.token_stream(self.tokenizer, "wikitext2", "train")

    def calibration_tokens(self, recipe: Recipe) -> int:
        """Tokens of the recipe's calibration windows."""
        if getattr(self.calib, "dim", lambda: 1)() == 2:  # [n, seq_len] windows are used as given
            return int(self.calib.numel())
        return int(recipe.calib_samples) * int(recipe.calib_seq_len)

    def calibration_hessians(self, recipe: Recipe):
        """GPTQ's Hessian ``2A`` of every linear layer (a :class:`~quantpredict.features.moments.MomentHessians`)
        on the recipe's own calibration windows, the windows ``quantize_model`` calibrates GPTQ and AWQ on
        (:func:`quantpredict.data.calibration_windows` of :meth:`calibration_ids`: ``calib_samples`` windows of
        ``calib_seq_len`` tokens at ``seed``; 128 x 256 at seed 0 by default; the length clipped to a shorter
        context, where ``quantize_model`` would fail: :func:`~quantpredict.features.extract.feature_windows`).
        Measured block by block with forward passes the first time a GPTQ or AWQ recipe of that calibration is
        priced, and kept in the profile's cache entry
        (:func:`~quantpredict.predict.profile_cache.calibration_moments_dir`). The profile's own 8 windows would give
        a Hessian of 2,048 tokens, rank-deficient for wide layers, that GPTQ overfits
        (reports/gptq_hessian_study.md)."""
        from quantpredict.features.moments import MomentHessians
        from quantpredict.predict import profile_cache

        key = self.calibration_key(recipe)
        if key not in self.calibration_moments:
            from quantpredict.features.extract import feature_windows

            target = (None if self.cache_dir is None else
                      profile_cache.calibration_moments_dir(self.cache_dir, *key))
            self.calibration_moments[key] = profile_cache.moments_on_demand(
                self.model, [r.name for r in self.refs],
                lambda: feature_windows(self.model, self.calibration_ids(), key[0], key[1], key[2]), target)
        return MomentHessians(self.calibration_moments[key])

    def hessians_for(self, recipe: Recipe, method: str | None = None):
        """:meth:`calibration_hessians` of a recipe that calibrates (``method``, default the recipe's, is GPTQ, or
        the recipe is AWQ-scaled), ``None`` for one that rounds without calibration: what the pricers take as
        ``hessians=``."""
        if (method or recipe.method) == "gptq" or recipe.awq:
            return self.calibration_hessians(recipe)
        return None

    def factor_cache(self, recipe: Recipe) -> dict:
        """The cache of GPTQ Hessian factors for the recipe's calibration (``factors=`` of
        :func:`~quantpredict.features.fisher.iter_profile_deltas`)."""
        return self.gptq_factors.setdefault(self.calibration_key(recipe), {})

    def embedding_head_stats(self):
        """The :class:`~quantpredict.features.embedding_head.EmbeddingHeadStats` on the profile's token windows
        (the first :data:`TOKEN_WINDOWS`), from the profile's cache entry or measured once and kept there."""
        if self.embedding_head is None:
            from quantpredict.predict.profile_cache import embedding_head_stats

            if self.windows is None:
                raise PredictorError(f"{self.name}: this profile has no calibration windows to measure the embedding "
                                     "and head statistics on; profile the model with profile_model()")
            self.embedding_head = embedding_head_stats(self.model, lambda: self.windows()[:TOKEN_WINDOWS],
                                                       self.cache_dir, seed=self.seed,
                                                       scored_from=self.profile.meta.get("scored_from"))
        return self.embedding_head


#: the profile's protocol: token-wise terms from the first TOKEN_WINDOWS windows, one sampled label, one window per
#: micro-batch (part of the cache key)
TOKEN_WINDOWS = 2


#: the evaluation protocols a price can be for, by name: ``(seq_len, scored_from)`` of the windows the KLD averages
#: over (:func:`quantpredict.evaluate.make_windows`). ``project``: 256-token windows, every position after the
#: first scored (the project's evaluations, the predictors' training runs); ``llama.cpp``: llama-perplexity's
#: 512-token chunks, positions 257 .. 511 scored (``--kl-divergence`` with ``-c 512``)
PROTOCOLS: dict[str, tuple[int, int | None]] = {"project": (256, None), "llama.cpp": (512, 257)}


def protocol_windows(protocol: str) -> tuple[int, int | None]:
    """``(seq_len, scored_from)`` of a protocol of :data:`PROTOCOLS`; a :class:`PredictorError` naming them."""
    if protocol not in PROTOCOLS:
        raise PredictorError(f"unknown protocol {protocol!r}; known protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def profile_model(model_or_path: Any, *, tokenizer: Any = None, calib: Any = None, seed: int = 0,
                  n_windows: int = 8, seq_len: int = 256, name: str | None = None,
                  cache: bool = True, scored_from: int | None = None) -> ModelProfile:
    """Load ``model_or_path`` (or take a loaded model with its ``tokenizer``) and measure its lean profile once
    (``measure_profile(kfac=False)``: the token-wise terms the weights-only price reads; GPTQ's input moments are
    measured block by block the first time a GPTQ recipe is priced).

    ``cache``: read the profile from, and write it to, the profile cache
    (:mod:`quantpredict.predict.profile_cache`: ``$QUANTPREDICT_HOME/profiles``, default
    ``~/.cache/quantpredict/profiles``), keyed by the weights, the calibration text, the protocol and the code
    version; a cached profile runs no backward pass (and tokenizes nothing), and prices exactly as the fresh one.

    ``seq_len`` and ``scored_from`` (:func:`~quantpredict.features.fisher.measure_profile`): the windows, and the
    first scored position of each, of the evaluation the prices are for (:data:`PROTOCOLS`)."""
    import torch

    from quantpredict import arch, data, models
    from quantpredict.evaluate.scoring import max_positions
    from quantpredict.features.extract import feature_windows
    from quantpredict.features.fisher import measure_profile
    from quantpredict.predict import profile_cache

    t0 = time.perf_counter()
    if isinstance(model_or_path, (str, Path)):
        model, tok = models.load(str(model_or_path), attn_implementation="eager")
        tokenizer = tokenizer or tok
        name = name or str(model_or_path)
    else:
        model = model_or_path
        name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
    if calib is None and tokenizer is None:
        raise PredictorError("got a model object without a tokenizer: pass tokenizer= (or calib=), or pass the "
                             "model's name or path instead")
    windows_cache: list = []

    def windows():
        if not windows_cache:
            stream = calib if calib is not None else data.token_stream(tokenizer, "wikitext2", "train")
            windows_cache.append(feature_windows(model, stream, n_windows, seq_len, seed))
        return windows_cache[0]

    limit = max_positions(model)
    two_d = isinstance(calib, torch.Tensor) and calib.dim() == 2
    if scored_from is not None and (seq_len if two_d or not limit else min(seq_len, limit)) <= scored_from:
        raise PredictorError(f"{name}: the protocol scores positions {scored_from} .. of {seq_len}-token windows, but "
                             f"the model's context is {limit} positions; price it for the project's protocol")
    entry = key = parts = None
    loaded = None
    if cache:
        protocol = {"n_windows": n_windows, "seq_len": min(seq_len, limit) if limit and not two_d else seq_len,
                    "seed": seed, "token_windows": TOKEN_WINDOWS, "label_samples": 1, "batch_size": 1,
                    "kfac": False} | ({} if scored_from is None else {"scored_from": scored_from})
        parts = profile_cache.key_parts(model_or_path, model, tokenizer, calib, protocol)
        key = profile_cache.cache_key(parts)
        entry = profile_cache.entry_dir(name, key)
        loaded = profile_cache.load(entry, key)
    if loaded is not None:
        profile, extra = loaded
        if isinstance(extra.get("windows"), torch.Tensor):  # GPTQ's input moments need no tokenizing either
            windows_cache.append(extra["windows"])
        fwd = float(extra["forward_seconds_per_window"])
        n_split = int(extra["full_split_windows"])
    else:
        profile = measure_profile(model, windows(), seed=seed, token_windows=TOKEN_WINDOWS, kfac=False,
                                  scored_from=scored_from)
        # the cost a full evaluation would have: one FP and one quantized forward per window of the whole test split
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=windows()[:1], use_cache=False)
        fwd = time.perf_counter() - t
        n_split = 0
        if tokenizer is not None:
            n_split = int(data.token_ids(tokenizer, "wikitext2", "test").numel() // windows().shape[1])
        if entry is not None and not profile_cache.save(entry, key, parts, profile, {
                "forward_seconds_per_window": fwd, "full_split_windows": n_split, "name": name}, windows()):
            entry = None
    profile_cache.attach_moments(profile, model, windows, entry)
    feats = {"n_params_nonembed": float(arch.non_embedding_parameters(model)),
             "n_layers": float(len(arch.blocks(model))), "hidden_size": float(arch.hidden_size(model)),
             "fp_calib_nll": profile.fp_nll, "fp_entropy_calib": profile.fp_entropy}
    return ModelProfile(name, model, profile, feats, arch.linear_layers(model), time.perf_counter() - t0, fwd,
                        n_split, cache_dir=entry, cached=loaded is not None, tokenizer=tokenizer,
                        source=model_or_path, windows=windows, seed=seed, calib=calib)


def fp_reference_of(mp: ModelProfile, ppl_fp: Any = None, fp_windows: int | None = None, cache: bool = True):
    """The profiled model's FP reference (:func:`~quantpredict.predict.fp_reference.resolve_fp_reference`, the one
    rank and allocate share with predict and demo)."""
    from quantpredict.predict.fp_reference import resolve_fp_reference

    src = mp.source if isinstance(mp.source, (str, Path)) else mp.model
    return resolve_fp_reference(src, model=mp.model, tokenizer=mp.tokenizer, ppl_fp=ppl_fp, fp_windows=fp_windows,
                                name=mp.name, cache=cache, flag="ppl_fp")


#: the damage bound: a recipe predicted past it (perplexity more than doubled, or KLD over 1 nat) is no candidate to
#: ship; ``rank`` folds such rows into one line unless ``--all``
DAMAGE_PPL_INCREASE_PCT = 100.0
DAMAGE_KLD = 1.0


def past_damage_bound(frame: pd.DataFrame) -> pd.Series:
    """True for rows whose predicted perplexity increase exceeds :data:`DAMAGE_PPL_INCREASE_PCT` percent or whose
    predicted KLD exceeds :data:`DAMAGE_KLD` nats."""
    inc = pd.to_numeric(frame.get("ppl_increase_pct"), errors="coerce") if "ppl_increase_pct" in frame else None
    kld = pd.to_numeric(frame["kld"], errors="coerce") if "kld" in frame else None
    out = pd.Series(False, index=frame.index)
    if inc is not None:
        out |= inc > DAMAGE_PPL_INCREASE_PCT
    if kld is not None:
        out |= kld > DAMAGE_KLD
    return out


def recipe_row(mp: ModelProfile, recipe: Recipe, *, runtime: str | None = None,
               imatrix: Any = None) -> dict[str, Any]:
    """One candidate's features from weights alone (``format`` and ``profile`` groups) and its size.

    Recipes with SmoothQuant or activation quantization are priced with the activation term
    (:func:`quantpredict.features.act_price.price_act_recipe`: the smoothed weights' change and the activation
    fake-quantization of every quantized layer's input, token-wise against the profile); the others by their weight
    change alone (:func:`~quantpredict.features.fisher.price_deltas`, which the former reduces to).

    ``runtime`` (``"llama.cpp-cpu"``, :mod:`quantpredict.runtime`): price the recipe as that runtime runs it, each
    quantized layer's input rounded to the runtime's activation format for its weight format (the weight+activation
    path above, with per-layer formats): the rounding enters the price, ``runtime_act`` names the formats (joined by
    ``+``), ``act_format`` stays the recipe's (the predictor's weight+activation indicator was fitted on MX
    activation formats, not on a runtime's 8-bit rounding), and ``runtime`` names the runtime. A
    :class:`RecipeError` for a weight format the runtime does not run. ``None``: the recipe as the project's own
    fake-quantized model runs it (``runtime`` column ``None``).

    ``imatrix`` (an :class:`~quantpredict.imatrix.Imatrix` or the path of a llama.cpp imatrix file): price the RTN
    of every layer of a llama.cpp type as llama-quantize quantizes it with that imatrix (its quant_weights per
    layer, by the layer's GGUF tensor name: :func:`quantpredict.imatrix.layer_importance`); only RTN recipes of
    llama.cpp types (:func:`check_imatrix_recipe`). The row's ``imatrix`` column names it (the file's name and a
    sha256 prefix); ``None`` without one, and then the row is exactly what it was before imatrices were priced."""
    from quantpredict.features.act_price import price_act_recipe
    from quantpredict.features.fisher import iter_profile_deltas, price_deltas
    from quantpredict.formats import get_format
    from quantpredict.quantize import layer_plan, size_report

    refuse_unpriced(recipe, runtime=runtime, imatrix=imatrix)
    t0 = time.perf_counter()
    plan = layer_plan(mp.model, recipe)
    planned = {p.ref.name: (p.weight_format, p.block_size) for p in plan}
    formats = [planned.get(r.name) for r in mp.refs]
    importance, im_label = None, None
    if imatrix is not None:
        from quantpredict.imatrix import layer_importance, load

        check_imatrix_recipe(recipe, formats)
        importance, im_label = layer_importance(mp.model, mp.refs, formats, imatrix), load(imatrix)[1]
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    hessians = mp.hessians_for(recipe)  # GPTQ and AWQ: priced against their own calibration's Hessians
    if hessians is not None:
        _warn_rank_deficient_gptq(mp, formats, recipe)
    runtime_act = None
    if runtime is not None:
        from quantpredict.runtime import activation_formats

        acts = dict(zip((p.ref.name for p in plan), activation_formats(mp.model, recipe, runtime), strict=True))
        per_ref = [acts.get(r.name) for r in mp.refs]
        # the runtime's rounding enters the price (token_gn_quad) but not act_format: the predictor's
        # weight+activation indicator was fitted on MX activation formats, and with it a runtime's rounding lowered
        # the prediction of IQ4_XS and Q3_K_M files (SmolLM2) below the recipe's own; runtime_act shows the formats
        runtime_act = "+".join(dict.fromkeys(a[0] for a in acts.values())) or None
        feats = price_act_recipe(mp.model, mp.profile, mp.refs, formats, recipe.method, act_format=None,
                                 act_block=None, smoothquant_alpha=recipe.smoothquant_alpha, gptq_options=gptq,
                                 act_formats=per_ref, importance=importance, hessians=hessians)
    elif recipe.act_format is not None or recipe.smoothquant_alpha is not None:
        feats = price_act_recipe(mp.model, mp.profile, mp.refs, formats, recipe.method, act_format=recipe.act_format,
                                 act_block=recipe.act_block, smoothquant_alpha=recipe.smoothquant_alpha,
                                 gptq_options=gptq, hessians=hessians)
    elif recipe.awq:
        from quantpredict.features.awq_price import iter_awq_deltas

        # one block's changes at a time (mp.refs run block by block), not the whole model's 4 bytes per weight
        deltas = iter_awq_deltas(mp.model, mp.refs, formats, recipe.method, mp.profile, gptq_options=gptq,
                                 hessians=hessians)
        feats = price_deltas(mp.profile, [r.name for r in mp.refs], deltas, kfac=False)
    else:
        # one layer's change at a time: holding every layer's (5.2 GB for a 1.5B model) set the 1.5B peak RSS
        deltas = iter_profile_deltas(mp.refs, formats, recipe.method, mp.profile, gptq_options=gptq,
                                     factors=mp.factor_cache(recipe), importance=importance, hessians=hessians)
        feats = price_deltas(mp.profile, [r.name for r in mp.refs], deltas, kfac=False)  # what the predictor reads
    feats |= _embedding_and_head_terms(mp, recipe, runtime, feats)
    rows = []
    for ref, fb in zip(mp.refs, formats):
        n = ref.weight.numel()
        if fb is None:
            rows.append((n, 16.0, 0.0, float(ref.in_features)))
        else:
            f = get_format(fb[0])
            rows.append((n, f.bits_per_element(fb[1], row_length=ref.in_features), float(f.element == "fp"),
                         float(fb[1] or ref.in_features)))
    total = sum(r[0] for r in rows)
    size = size_report(mp.model, recipe)
    return {**mp.model_features, **feats,
            "bits_per_element": sum(r[0] * r[1] for r in rows) / total,
            "element_is_fp": sum(r[0] * r[2] for r in rows) / total,
            "block_size": sum(r[0] * r[3] for r in rows) / total,
            "weight_format": recipe.weight_format, "method": recipe.method_name, "block_size_recipe":
            recipe.block_size, "smoothquant_alpha": (np.nan if recipe.smoothquant_alpha is None
                                                     else recipe.smoothquant_alpha),
            "act_format": recipe.act_format, "runtime": runtime, "runtime_act": runtime_act, "imatrix": im_label,
            "recipe": recipe.label,
            "size_bytes": size["size_bytes"], "bf16_size_bytes": size["bf16_size_bytes"],
            "model_bits_per_param": size["model_bits_per_param"], "price_seconds": time.perf_counter() - t0}


def _embedding_and_head_terms(mp: ModelProfile, recipe: Recipe, runtime: str | None,
                              feats: dict[str, float]) -> dict[str, float]:
    """``embedding_quad`` and ``head_quad`` of a recipe that quantizes the token embedding or the head (0 for one
    that does not; :func:`quantpredict.features.embedding_head.price_embedding_and_head`), and ``token_gn_quad`` and
    ``kfac_max_layer_share`` with the two matrices counted as two more layers."""
    from quantpredict.features.embedding_head import price_embedding_and_head, with_embedding_and_head
    from quantpredict.quantize.plan import embedding_and_head_plan

    if not embedding_and_head_plan(mp.model, recipe):
        return {"embedding_quad": 0.0, "head_quad": 0.0}
    terms = price_embedding_and_head(mp.model, mp.embedding_head_stats(), recipe, runtime=runtime)
    return with_embedding_and_head(feats, terms)


def refuse_unpriced(recipe: Recipe, *, runtime: str | None = None, imatrix: Any = None) -> None:
    """A :class:`RecipeError` for a recipe the weights-only path does not price (:func:`weights_only`), or an AWQ
    recipe with a runtime or an imatrix; checked on the recipe alone, so before any loading."""
    if not weights_only(recipe):
        raise RecipeError(f"rank prices post-training recipes from the weights; {recipe.label} needs QAT, or AWQ with "
                          "activation quantization: predict it with `quantpredict predict` instead")
    if recipe.awq and (runtime is not None or imatrix is not None):
        raise RecipeError(f"{recipe.label}: AWQ is priced for the project's own model, without a runtime's rounding "
                          "or an imatrix (llama.cpp's files are not AWQ-scaled); drop --runtime/--imatrix or awq")


def weights_only(recipe: Recipe) -> bool:
    """Whether the weights-only path prices ``recipe``: post-training quantization (RTN or GPTQ, uniform, per-layer
    or a named mix), with or without SmoothQuant and activation quantization (their statistics and inputs come from
    the profile's token inputs: :mod:`quantpredict.features.act_price`), or AWQ of weights alone (its search run on
    the profile's statistics: :mod:`quantpredict.features.awq_price`). QAT needs a training run, and AWQ with
    activation quantization or SmoothQuant is not priced;
    :func:`~quantpredict.predict.quality.predict_quality` measures those on the calibration batch instead, and says
    so."""
    return not (recipe.qat or (recipe.awq and (recipe.act_format is not None or recipe.smoothquant_alpha is not None)))


def price(mp: ModelProfile, recipes: Sequence[Recipe], pred: Any, ref: Any, *,
          runtime: str | None = None, imatrix: Any = None) -> pd.DataFrame:
    """The one pricing path of ``predict``, ``rank``, ``allocate`` and ``demo``: each recipe's weights-only features
    (:func:`recipe_row`) with the FP reference ``ref``'s columns, turned into KLD, delta NLL, perplexity and top-1
    with intervals by the ``profile`` predictor ``pred``; one row per recipe, in order. A recipe's row does not depend
    on the other rows, so a recipe priced alone and priced in a grid gets the same numbers, bit for bit.
    ``runtime``: price every recipe as that runtime runs it (``"llama.cpp-cpu"``: its activation rounding too, see
    :func:`recipe_row`); ``None``, the project's fake-quantized model. ``attrs["predicted"]`` names the predictor's
    output columns, ``attrs["runtime"]`` the runtime. ``imatrix``: price every recipe's RTN of llama.cpp types with
    that importance matrix (:func:`recipe_row`); ``attrs["imatrix"]`` names it."""
    from quantpredict.predict.fp_reference import label_output

    frame = pd.DataFrame([recipe_row(mp, r, runtime=runtime, imatrix=imatrix) for r in recipes])
    for k, v in ref.columns().items():
        frame[k] = v
    out = pred.predict(frame)
    label_output(out, ref)
    priced = frame.drop(columns=[c for c in out.columns if c in frame]).join(out)
    priced.attrs["predicted"] = list(out.columns)  # what the predictor added (the rest are its inputs)
    priced.attrs["runtime"] = runtime
    priced.attrs["imatrix"] = None if imatrix is None else priced["imatrix"].iloc[0] if len(priced) else None
    return priced


def pareto_mask(bits: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True where no other candidate has at most as many bits and a strictly lower cost (or equal cost and fewer
    bits): the frontier of cost against bits."""
    n = len(bits)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = (bits <= bits[i]) & ((cost < cost[i]) | ((cost == cost[i]) & (bits < bits[i])))
        out[i] = not dominated.any()
    return out


def recommend(frame: pd.DataFrame, *, max_bits: float | None = None, max_kld: float | None = None,
              max_ppl_increase: float | None = None) -> int | None:
    """The index of the recommended row under one constraint (on the point predictions): the lowest predicted KLD
    within ``max_bits``; or the fewest bits whose predicted KLD is at most ``max_kld``, or whose predicted perplexity
    is at most ``max_ppl_increase`` percent above the FP one (ties: the lower KLD). ``None`` if nothing qualifies."""
    given = [v is not None for v in (max_bits, max_kld, max_ppl_increase)]
    if sum(given) > 1:
        raise PredictorError("give one constraint at a time: max_bits, max_kld or max_ppl_increase")
    if not any(given):
        return None
    if max_bits is not None:
        ok = frame[frame["bits_per_element"] <= max_bits + 1e-9]
        return None if ok.empty else ok["kld"].idxmin()
    if max_kld is not None:
        ok = frame[frame["kld"] <= max_kld]
    else:
        ok = frame[100 * (frame["ppl"] / frame["ppl_fp"] - 1) <= max_ppl_increase]
    return None if ok.empty else ok.sort_values(["bits_per_element", "kld"]).index[0]


def _check_constraint(name: str, value: float | None, lo: float, hint: str) -> None:
    if value is not None and not (np.isfinite(value) and value > lo):
        raise PredictorError(f"{name} must be a number above {lo:g} ({hint}), got {value!r}")


def rank_recipes(model: Any, recipes: Sequence[Recipe | str] | None = None, *, predictor: Any = "default",
                 max_bits: float | None = None, max_kld: float | None = None,
                 max_ppl_increase: float | None = None, tokenizer: Any = None, ppl_fp: Any = None,
                 progress: bool = False, calib: Any = None, cache: bool = True,
                 fp_windows: int | None = None, runtime: str | None = None, imatrix: Any = None,
                 protocol: str = "project") -> pd.DataFrame:
    """Every candidate recipe of ``model`` with its predicted KLD, delta NLL, perplexity and top-1 (90% intervals),
    bits per element, size, a Pareto flag, and the recommendation under at most one constraint.

    ``model``: a zoo name, an imported model or an HF directory, or a loaded model (with ``tokenizer``).
    ``recipes``: Recipes, labels or named mixes (``q4_k_m``, ``q5_k_m-gptq``: resolved for the model's layers, see
    :mod:`quantpredict.mixes`); default the shipped grid (14 formats x RTN/GPTQ); the ``mix`` column names the mix
    a row came from. ``predictor``: ``"default"``
    (the shipped ``profile`` predictor, which needs nothing but weights per recipe), a directory or a fitted
    predictor of kind ``profile``. ``max_bits`` (bits per element), ``max_kld`` (nats) or ``max_ppl_increase``
    (percent of the FP perplexity). ``ppl_fp``: the FP reference
    (:func:`~quantpredict.predict.fp_reference.resolve_fp_reference`: ``None`` for the zoo card, the cached
    measurement or a fresh one on ``fp_windows`` windows; a measured number; ``"predicted"``). ``calib``:
    calibration ids or a :class:`~quantpredict.data.TokenStream` (default: WikiText-2 train through ``tokenizer``).
    ``cache``: read and write the profile cache (:func:`profile_model`) and the FP reference's. ``runtime``
    (``"llama.cpp-cpu"``): price every candidate as that runtime runs it, its activation rounding included
    (:func:`recipe_row`; the candidates must use the runtime's weight formats); ``None``: the project's model.
    ``imatrix`` (an :class:`~quantpredict.imatrix.Imatrix` or a llama.cpp imatrix file): price every candidate's
    RTN of llama.cpp types as llama-quantize --imatrix quantizes it (the candidates must be RTN recipes of
    llama.cpp types, checked before the model loads; the file is read first too). ``protocol``
    (:data:`PROTOCOLS`): the evaluation the predicted KLD, delta NLL and top-1 are for; ``"llama.cpp"`` prices
    against a profile of llama-perplexity's windows (512 tokens, the second half scored; its own cache entry). The
    predictor maps the price to KLD as fitted on the project's protocol (the price is the second-order KLD itself,
    its constant 1 by construction), and the perplexity columns move the FP reference, which is the project
    protocol's, by the predicted delta NLL.

    Returns a DataFrame sorted by bits then predicted KLD; ``attrs`` holds ``recommended`` (a label or None),
    ``constraint``, ``seconds`` (total), ``profile_seconds``, ``full_eval_seconds`` and ``full_eval`` (the shared
    estimate, :func:`~quantpredict.predict.fp_reference.full_eval_cost`), ``fp_reference`` (a dict),
    ``profile_cached`` (whether the profile came from the cache), ``kept_16bit`` and ``runtime``. Columns include
    ``ppl_increase_pct`` and ``past_damage_bound`` (:func:`past_damage_bound`) and ``out_of_range`` (the inputs of
    the row outside the predictor's training ranges).
    """
    from tqdm.auto import tqdm

    from quantpredict import arch
    from quantpredict.predict.fp_reference import check_fp_windows, check_ppl_fp, full_eval_cost

    _check_constraint("max_bits", max_bits, 0, "bits per element, e.g. 4.5")
    _check_constraint("max_kld", max_kld, 0, "nats, e.g. 0.01")
    _check_constraint("max_ppl_increase", max_ppl_increase, 0, "percent of the FP perplexity, e.g. 5")
    if ppl_fp is not None and not hasattr(ppl_fp, "columns"):
        check_ppl_fp(ppl_fp, "ppl_fp")
    if fp_windows is not None:
        check_fp_windows(fp_windows, "fp_windows")
    recommend(pd.DataFrame(columns=["bits_per_element", "kld", "ppl", "ppl_fp"]), max_bits=max_bits,
              max_kld=max_kld, max_ppl_increase=max_ppl_increase)  # one constraint at most, checked before work
    pred = resolve_predictor(PROFILE_PREDICTOR_DIR if str(predictor) == "default" else predictor)
    if getattr(pred, "kind", None) != "profile":
        raise PredictorError(f"rank prices recipes from weights alone and needs a 'profile' predictor; got kind "
                             f"{getattr(pred, 'kind', None)!r} (fit one with `quantpredict fit --kind profile`)")
    from quantpredict.mixes import is_mix_spec, resolve_recipe

    specs = list(recipes if recipes is not None else default_recipes())
    if runtime is not None:
        from quantpredict.runtime import activation_format, runtime_table

        runtime_table(runtime)
    for s in specs:  # bad labels fail before the model is loaded; mixes need its layers
        if not is_mix_spec(s):
            r = Recipe.coerce(s)
            refuse_unpriced(r, runtime=runtime, imatrix=imatrix)
            if runtime is not None:  # a weight format the runtime does not run, before the profile is measured
                for fmt in (r.weight_format, r.head_format):
                    if fmt is not None:
                        activation_format(fmt, runtime)
            if imatrix is not None:
                check_imatrix_recipe(r)
    if not specs:
        raise RecipeError("rank_recipes needs at least one candidate recipe")
    if imatrix is not None:
        from quantpredict.imatrix import load

        load(imatrix)  # a missing or malformed file fails before the model loads
    seq_len, scored_from = protocol_windows(protocol)
    t0 = time.perf_counter()
    mp = profile_model(model, tokenizer=tokenizer, calib=calib, cache=cache, seq_len=seq_len,
                       scored_from=scored_from)
    t_fp = time.perf_counter()
    ref = fp_reference_of(mp, ppl_fp, fp_windows, cache)
    fp_seconds = time.perf_counter() - t_fp
    resolved = [resolve_recipe(s, mp.model) for s in specs]
    frame = pd.concat([price(mp, [r], pred, ref, runtime=runtime, imatrix=imatrix)
                       for r in tqdm(resolved, desc="rank", unit="recipe", disable=not progress)], ignore_index=True)
    frame["mix"] = [s if is_mix_spec(s) else None for s in specs]
    frame["past_damage_bound"] = past_damage_bound(frame)
    frame["pareto"] = pareto_mask(frame["bits_per_element"].to_numpy(float), frame["kld"].to_numpy(float))
    frame = frame.sort_values(["bits_per_element", "kld"]).reset_index(drop=True)
    best = recommend(frame, max_bits=max_bits, max_kld=max_kld, max_ppl_increase=max_ppl_increase)
    frame["recommended"] = False
    if best is not None:
        frame.loc[best, "recommended"] = True
    kept = [type(m).__name__ for m in arch.embedding_modules(mp.model)] + ["lm_head (" + (
        "tied to the embedding" if arch.head_is_tied(mp.model) else "own weights") + "; both quantized where a "
        "recipe says E=/H= or a mix -file)"]
    total = time.perf_counter() - t0
    frame.attrs.update({
        "model": mp.name, "recommended": None if best is None else frame.loc[best, "recipe"],
        "constraint": {"max_bits": max_bits, "max_kld": max_kld, "max_ppl_increase": max_ppl_increase},
        "seconds": total, "profile_seconds": mp.seconds, "profile_cached": mp.cached,
        "seconds_per_recipe": float(frame["price_seconds"].mean()),
        "full_eval_seconds": full_eval_cost(ref).seconds, "full_eval": full_eval_cost(ref).to_dict(),
        "fp_reference": ref.to_dict(), "fp_seconds": fp_seconds,
        "kept_16bit": kept + ["norms and biases", "layers a recipe leaves unquantized"],
        "predictor_kind": pred.kind, "runtime": runtime, "protocol": protocol,
        "imatrix": None if imatrix is None else frame["imatrix"].iloc[0],
    })
    return frame


COLUMNS = ("recipe", "mix", "bits_per_element", "size_bytes", "kld", "kld_low", "kld_high", "delta_nll", "ppl",
           "ppl_low", "ppl_high", "ppl_increase_pct", "top1", "pareto", "recommended", "past_damage_bound",
           "out_of_range", "price_seconds")
