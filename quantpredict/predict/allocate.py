"""Per-layer formats under a bit budget: minimise the predicted KLD from per-layer quantities.

The model is profiled once (:func:`quantpredict.predict.rank.profile_model`). For every linear layer ``l`` and
candidate format ``f`` the layer's own second-order KL, priced token-wise against the profile
(``c[l, f] = 0.5 mean_t (s_t^T dW x_t)^2`` over the profile's per-token layer inputs ``x_t`` and sampled output
gradients ``s_t``, the layer's term of ``token_gn_quad``), and its storage ``b[l, f]`` (bits per element times
elements) are computed from the weights alone. The
allocation minimises ``sum_l c[l, f_l]`` subject to ``sum_l b[l, f_l] <= B * sum_l n_l``: a multiple-choice
knapsack, solved by Lagrangian relaxation (each layer takes ``argmin_f c[l, f] + lambda b[l, f]``, bisection on
``lambda`` to the budget) and then a greedy fill of the budget left over, best cost reduction per bit first.

Cross-layer terms: the objective is additive over layers, i.e. the Fisher is taken block-diagonal (the profile
prices each layer on its own). Interactions between layers' errors are therefore not modelled by the
allocation; the predicted KLD of the result comes from the ``profile`` predictor, whose constant was fitted on
measured KLDs of whole models (so it absorbs their average effect), and the allocated recipes are measured in
the run store beside the uniform ones.

A (layer, format) pair the layout cannot store (a k-quant on rows that are not a multiple of 256) is not a choice
for that layer. ``match="q4_k_m"`` allocates against one of llama.cpp's named mixes (:mod:`quantpredict.mixes`):
the budget is the mix's bits, the candidates default to the formats the mix uses on this model, and the mix is
priced beside the allocation (``compared``, with any other ``compare`` recipes), by the same objective and
predictor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError, RecipeError
from quantpredict.recipe import Recipe, mixed_recipe

DEFAULT_CANDIDATES: tuple[str, ...] = ("mxint3", "mxint4", "mxfp4_e2m1", "mxint6", "mxfp6_e2m3", "mxfp6_e3m2",
                                       "mxint8", "mxfp8_e4m3")


@dataclass(frozen=True)
class Allocation:
    """The chosen recipe and what the allocation expected of it.

    ``recipe``: an explicit per-layer recipe (``L=...`` label); ``bits_per_element``: its average over the quantized
    linears; ``objective``: the summed per-layer second-order KL (nats); ``prediction``: the predictor's row for it
    (kld, ppl... with intervals); ``layers``: one row per layer (name, elements, format, bits, cost);
    ``best_uniform``: the best uniform candidate (same method) of no more bits, by predicted KLD (by the summed
    per-layer KL without a predictor), with its ``prediction``; ``uniform_better``: whether it is predicted better
    than the allocation (None without a predictor); ``fp_reference``: the FP reference the perplexities rest on;
    ``full_eval``: the shared estimate of a full evaluation's cost;
    ``compared``: the matched mix and the ``compare`` recipes, each with its bits, objective and prediction.
    """

    recipe: Recipe
    target_bits: float
    bits_per_element: float
    objective: float
    prediction: dict[str, Any]
    layers: pd.DataFrame
    best_uniform: dict[str, Any] | None
    seconds: float
    lagrange_multiplier: float
    notes: tuple[str, ...] = field(default=())
    compared: tuple[dict[str, Any], ...] = field(default=())
    fp_reference: dict[str, Any] | None = None
    uniform_better: bool | None = None
    full_eval: dict[str, Any] | None = None


def solve_budget(cost: np.ndarray, bits: np.ndarray, budget: float) -> tuple[np.ndarray, float]:
    """Choose one option per row minimising ``sum cost[i, choice_i]`` with ``sum bits[i, choice_i] <= budget``.

    ``cost``, ``bits``: ``[layers, options]`` (``bits`` already multiplied by each layer's element count). Returns
    ``(choice [layers], lambda)``. An option of infinite cost or bits is not a choice (a layout that cannot store
    that layer); every row needs a finite one. Raises :class:`RecipeError` when even the cheapest choice exceeds
    the budget.
    """
    cost, bits = np.asarray(cost, float), np.asarray(bits, float)
    rows = np.arange(len(cost))
    feasible = np.isfinite(cost) & np.isfinite(bits)
    if not feasible.any(axis=1).all():
        raise RecipeError("every layer needs at least one candidate of finite cost and bits")
    if bits.min(axis=1).sum() > budget * (1 + 1e-12):
        raise RecipeError(f"the bit budget ({budget:,.0f} bits) is below what the fewest-bit candidate of every "
                          f"layer needs ({bits.min(axis=1).sum():,.0f} bits); raise it or add smaller candidate "
                          "formats")

    def pick(lam: float) -> np.ndarray:
        score = np.where(feasible, cost + lam * np.where(feasible, bits, 0.0), np.inf)
        best = score.min(axis=1, keepdims=True)
        # ties (common at lam = 0 for formats of equal cost) go to the fewer bits
        return np.where(score <= best + 1e-15 * np.abs(best), bits, np.inf).argmin(axis=1)

    lo, hi = 0.0, 1.0
    if bits[rows, pick(0.0)].sum() <= budget:
        choice, lam = pick(0.0), 0.0
    else:
        while bits[rows, pick(hi)].sum() > budget:
            hi *= 2
            if hi > 1e30:
                break
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if bits[rows, pick(mid)].sum() > budget:
                lo = mid
            else:
                hi = mid
        choice, lam = pick(hi), hi
    # greedy fill: spend what is left on the upgrades with the largest cost reduction per extra bit
    used = bits[rows, choice].sum()
    while True:
        gain = cost[rows, choice][:, None] - cost
        extra = bits - bits[rows, choice][:, None]
        ok = feasible & (gain > 0) & (extra > 0) & (extra <= budget - used + 1e-9)
        if not ok.any():
            break
        with np.errstate(invalid="ignore"):
            ratio = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
        i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
        used += extra[i, j]
        choice[i] = j
    return choice, lam


def layer_table(mp, candidates: Sequence[tuple[str, int | None]], method: str, base: Recipe
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cost [L, F], bits_per_element [L, F], elements [L])`` of every linear layer under every candidate."""
    from quantpredict.features.fisher import layer_prices, profile_deltas
    from quantpredict.formats import get_format

    refs = mp.refs
    L, F = len(refs), len(candidates)
    cost, bpe = np.full((L, F), np.inf), np.full((L, F), np.inf)
    gptq = {"blocksize": base.gptq_blocksize, "percdamp": base.percdamp, "act_order": base.act_order}
    # GPTQ rounds against the Hessians of the recipe's own calibration windows, as rank prices it
    hessians = mp.hessians_for(base, method)
    for j, (fmt, bs) in enumerate(candidates):
        f = get_format(fmt)
        fb = (fmt, bs if bs is not None else f.default_block_size)
        for i, ref in enumerate(refs):
            if not _fits(f, ref.in_features):
                continue  # e.g. a k-quant on rows that are not a multiple of 256: not a choice for this layer
            d = profile_deltas([ref], [fb], method, mp.profile, gptq_options=gptq, factors=mp.factor_cache(base),
                               hessians=hessians)[0]
            cost[i, j] = layer_prices(mp.profile, ref.name, d, kfac=False)[2]
            bpe[i, j] = f.bits_per_element(fb[1], row_length=ref.in_features)
    stuck = [refs[i] for i in range(L) if not np.isfinite(cost[i]).any()]
    if stuck:
        r = stuck[0]
        raise RecipeError(f"layer {r.name} (rows of {r.in_features}) fits none of the candidate formats "
                          f"{', '.join(f for f, _ in candidates)} ({len(stuck)} such layers): llama.cpp layouts need "
                          "rows that are a multiple of their block (256 for k-quants and iq4_xs, 32 for the others); "
                          "add a format that fits, e.g. q5_0, q8_0 or an MX format")
    sizes = np.array([r.weight.numel() for r in refs], float)
    return cost, bpe, sizes


def least_budget(model: Any, candidates: Sequence[tuple[str, int | None]]) -> tuple[float, str]:
    """``(bits per weight, format)``: the fewest bits per weight any allocation from ``candidates`` can reach on
    ``model`` (each linear layer in its fewest-bit candidate that fits its rows, averaged over the layers'
    weights) and the candidate most layers then take. ``model``: a loaded model, or a zoo name / directory, read
    from its config alone (:func:`quantpredict.models.skeleton`: shapes, no weights)."""
    from quantpredict import arch
    from quantpredict.formats import get_format

    if not hasattr(model, "named_modules"):
        from quantpredict.models import skeleton

        model = skeleton(model)
    total = weights = 0.0
    votes: dict[str, float] = {}
    for ref in arch.linear_layers(model):
        n = float(ref.weight.numel())
        options = [(get_format(f).bits_per_element(b if b is not None else get_format(f).default_block_size,
                                                   row_length=ref.in_features), f) for f, b in candidates
                   if _fits(get_format(f), ref.in_features)]
        if not options:
            continue  # fits no candidate: layer_table names the layer
        bits, fmt = min(options)
        total, weights = total + bits * n, weights + n
        votes[fmt] = votes.get(fmt, 0.0) + n
    return (total / weights if weights else 0.0), max(votes, key=votes.get, default="")


def check_budget(model: Any, target_bits: float, candidates: Sequence[tuple[str, int | None]]) -> float:
    """Raise :class:`RecipeError` when ``target_bits`` is below :func:`least_budget`, saying the least feasible
    budget in bits per weight; returns that budget."""
    least, fmt = least_budget(model, candidates)
    if target_bits < least - 1e-9:
        name = "this model" if hasattr(model, "named_modules") else str(model)
        raise RecipeError(f"a budget of {target_bits:g} bits per weight is below the least feasible one for {name}: "
                          f"{least:.3f} bits per weight (every linear layer in its fewest-bit candidate, mostly "
                          f"{fmt}); raise the budget to at least {least:.3f} or add smaller candidate formats")
    return least


def _fits(fmt, in_features: int) -> bool:
    from quantpredict.errors import FormatError

    try:
        fmt.check_row_length(in_features)
    except FormatError:
        return False
    return True


def recipe_objective(mp, recipe: Recipe) -> tuple[float, float]:
    """``(summed per-layer second-order KL, bits per element)`` of any recipe, by the allocation's objective."""
    from quantpredict.features.fisher import iter_profile_deltas, layer_prices
    from quantpredict.formats import get_format
    from quantpredict.quantize import layer_plan

    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(mp.model, recipe)}
    formats = [planned.get(r.name) for r in mp.refs]
    gptq = {"blocksize": recipe.gptq_blocksize, "percdamp": recipe.percdamp, "act_order": recipe.act_order}
    hessians = mp.hessians_for(recipe)
    deltas = iter_profile_deltas(mp.refs, formats, recipe.method, mp.profile, gptq_options=gptq,
                                 factors=mp.factor_cache(recipe), hessians=hessians)  # one layer's change at a time
    total = bits = elements = 0.0
    for ref, fb, d in zip(mp.refs, formats, deltas, strict=True):
        n = ref.weight.numel()
        elements += n
        if fb is None:
            bits += 16.0 * n
            continue
        total += layer_prices(mp.profile, ref.name, d, kfac=False)[2]
        bits += get_format(fb[0]).bits_per_element(fb[1], row_length=ref.in_features) * n
    return float(total), bits / elements


def _parse_candidates(candidates: Sequence[str]) -> list[tuple[str, int | None]]:
    from quantpredict.recipe import _split_block

    out = []
    for c in candidates:
        fmt, bs = _split_block(str(c).strip())
        Recipe(fmt, block_size=bs)  # validates the name and block size
        out.append((fmt, bs))
    if len(out) < 2:
        raise RecipeError("allocate needs at least two candidate formats to choose between")
    return out


def _predict_row(pred, mp, recipe: Recipe, ref) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe's features and its prediction, by the one pricing path rank and predict use
    (:func:`~quantpredict.predict.rank.price`); without a predictor, the features and the price alone."""
    from quantpredict.predict.rank import price, recipe_row

    if pred is None:  # allocation alone, nothing predicted
        row = recipe_row(mp, recipe)
        return row, {"token_gn_quad": row["token_gn_quad"]}
    priced = price(mp, [recipe], pred, ref)
    row = priced.iloc[0].to_dict()
    return row, {k: row[k] for k in [*priced.attrs["predicted"], "token_gn_quad"]}


def _compared(pred, mp, specs: Sequence[Any], ppl_fp) -> list[dict[str, Any]]:
    from quantpredict.mixes import is_mix_spec, resolve_recipe

    out = []
    for spec in specs:
        recipe = resolve_recipe(spec, mp.model)
        objective, bits = recipe_objective(mp, recipe)
        _, prediction = _predict_row(pred, mp, recipe, ppl_fp)
        out.append({"recipe": recipe.label, "mix": spec if is_mix_spec(spec) else None, "bits_per_element": bits,
                    "objective": objective, "prediction": prediction})
    return out


def allocate(model: Any, target_bits: float | None = None, *, candidates: Sequence[str] | None = None,
             method: str = "rtn", predictor: Any = "default", tokenizer: Any = None, profile=None,
             ppl_fp: Any = None, match: str | None = None, compare: Sequence[Any] = (),
             calib: Any = None, cache: bool = True, fp_windows: int | None = None) -> Allocation:
    """Per-layer formats for ``model`` from ``candidates`` (format names, ``_bN`` for a block size; default
    :data:`DEFAULT_CANDIDATES`) with at most ``target_bits`` bits per element on average over the quantized linears,
    minimising the predicted KLD.

    ``method``: ``rtn`` or ``gptq`` for every layer (GPTQ costs come from per-layer GPTQ against the profile's
    Hessian). ``profile``: a :class:`~quantpredict.predict.rank.ModelProfile` already measured (else measured
    here). ``match``: a named mix (``q4_k_m``) to allocate against: ``target_bits`` defaults to its bits and
    ``candidates`` to the formats it uses on this model. ``compare``: more recipes, labels or mixes to price beside
    the allocation. ``predictor=None`` allocates without predicting the result (before a predictor is fitted).
    ``calib``: calibration ids for the profile (default: WikiText-2 train). ``cache``: read and write the profile
    cache (:func:`~quantpredict.predict.rank.profile_model`) and the FP reference's. ``ppl_fp``: the FP reference
    (:func:`~quantpredict.predict.fp_reference.resolve_fp_reference`: ``None`` for the zoo card, the cached
    measurement or a fresh one; a measured number; ``"predicted"``; or an ``FPReference``, e.g. one resolved with
    another ``fp_windows``). Returns an :class:`Allocation` whose
    ``recipe`` quantize_model, the features, predict and the run store all take; its ``best_uniform`` is the
    uniform candidate of the same method within the budget with the lowest *predicted* KLD (its prediction
    included), and ``uniform_better`` says whether it is predicted better than the allocation.

    Thirteen parameters, on purpose: past the model and the budget, the keyword-only options are independent of
    each other (what to choose from, the method, the predictor, the tokenizer, a measured profile, the FP
    perplexity and its window count, a mix to match, recipes to compare, calibration data, the cache) and no frozen
    config of the package groups them; each is a documented keyword of the public API.
    """
    from quantpredict.mixes import is_mix_spec, resolve_recipe
    from quantpredict.predict.fp_reference import check_fp_windows, check_ppl_fp, full_eval_cost
    from quantpredict.predict.rank import PROFILE_PREDICTOR_DIR, profile_model
    from quantpredict.predict.shipped import resolve_predictor

    if ppl_fp is not None and not hasattr(ppl_fp, "columns"):
        check_ppl_fp(ppl_fp, "ppl_fp")
    if fp_windows is not None:
        check_fp_windows(fp_windows, "fp_windows")
    if match is not None and not is_mix_spec(match):
        raise RecipeError(f"match={match!r} is not a named mix; see quantpredict.mixes.MIX_NAMES")
    if target_bits is None and match is None:
        raise RecipeError("give target_bits (bits per element) or match (a named mix whose bits to match)")
    if target_bits is not None and not (np.isfinite(target_bits) and target_bits > 0):
        raise RecipeError(f"target_bits must be a positive number of bits per element, got {target_bits!r}")
    if method not in ("rtn", "gptq"):
        raise RecipeError(f"allocate's method must be rtn or gptq, got {method!r}")
    if candidates is not None or match is None:
        cands = _parse_candidates(DEFAULT_CANDIDATES if candidates is None else candidates)
    if target_bits is not None and (candidates is not None or match is None):
        # from the module tree alone (shapes, no weights): an infeasible budget fails before the profile is measured
        check_budget(profile.model if profile is not None else model, target_bits, cands)
    pred = None
    if predictor is not None:
        pred = resolve_predictor(PROFILE_PREDICTOR_DIR if str(predictor) == "default" else predictor)
        if getattr(pred, "kind", None) != "profile":
            raise PredictorError("allocate needs a 'profile' predictor (it prices layers from weights alone)")
    t0 = time.perf_counter()
    mp = profile if profile is not None else profile_model(model, tokenizer=tokenizer, calib=calib, cache=cache)
    ref = None
    if pred is not None:
        from quantpredict.predict.rank import fp_reference_of

        ref = fp_reference_of(mp, ppl_fp, fp_windows, cache)
    specs = [match, *compare] if match is not None else list(compare)
    if match is not None:
        mix = resolve_recipe(match, mp.model)
        if candidates is None:
            cands = _parse_candidates(sorted({f for f, _ in mix.layer_formats}))
        if target_bits is None:
            target_bits = recipe_objective(mp, mix)[1]
    base = Recipe(cands[0][0], method=method)
    cost, bpe, sizes = layer_table(mp, cands, method, base)
    choice, lam = solve_budget(cost, bpe * sizes[:, None], target_bits * sizes.sum())
    rows = np.arange(len(choice))
    chosen = [cands[j] for j in choice]
    recipe = mixed_recipe(base, chosen)
    _, prediction = _predict_row(pred, mp, recipe, ref)
    layers = pd.DataFrame({"layer": [r.name for r in mp.refs], "elements": sizes.astype(int),
                           "format": [f"{f}" + (f"_b{b}" if b else "") for f, b in chosen],
                           "bits_per_element": bpe[rows, choice], "cost": cost[rows, choice]})
    uniform = []
    for j, (fmt, bs) in enumerate(cands):
        bits_j = float((bpe[:, j] * sizes).sum() / sizes.sum())
        if np.isfinite(bits_j) and bits_j <= target_bits + 1e-9:
            uniform.append({"recipe": Recipe(fmt, block_size=bs, method=method).label, "bits_per_element": bits_j,
                            "objective": float(cost[:, j].sum())})
    uniform_better = None
    if uniform and pred is not None:
        # the uniform candidates priced by the same predictor: the allocation must beat the best of them to be worth
        # its per-layer recipe (the summed per-layer KL ignores cross-layer terms, the predicted KLD does not)
        for u in uniform:
            u["prediction"] = _predict_row(pred, mp, Recipe.from_label(u["recipe"]), ref)[1]
        best_uniform = min(uniform, key=lambda u: u["prediction"]["kld"])
        uniform_better = bool(best_uniform["prediction"]["kld"] < prediction["kld"])
    else:
        best_uniform = min(uniform, key=lambda u: u["objective"]) if uniform else None
    return Allocation(recipe=recipe, target_bits=float(target_bits),
                      bits_per_element=float((bpe[rows, choice] * sizes).sum() / sizes.sum()),
                      objective=float(cost[rows, choice].sum()), prediction=prediction, layers=layers,
                      best_uniform=best_uniform, seconds=time.perf_counter() - t0, lagrange_multiplier=float(lam),
                      notes=("cross-layer terms of the Fisher are not modelled (the objective is additive over "
                             "layers)",), compared=tuple(_compared(pred, mp, specs, ref)),
                      fp_reference=None if ref is None else ref.to_dict(), uniform_better=uniform_better,
                      full_eval=None if ref is None else full_eval_cost(ref).to_dict())
