"""The KLD-first predictors: the second-order backbone against exact references, the K-FAC pricing against an
explicit Kronecker product, the laws' fit, intervals and out-of-range handling on synthetic runs, save/load, and
rank/allocate."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model

from quantpredict import arch
from quantpredict.features.fisher import fisher_measures, kfac_quadratic, measure_profile
from quantpredict.predict.allocate import solve_budget
from quantpredict.predict.physics import OutOfRangeWarning, PhysicsPredictor
from quantpredict.predict.rank import pareto_mask, recommend


def _rtn_deltas(model, fmt="int4"):
    from quantpredict.formats import fake_quantize

    refs = arch.linear_layers(model)
    with torch.no_grad():
        return refs, [fake_quantize(r.weight.detach(), fmt) - r.weight.detach() for r in refs]


def _windows(n=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n, L), generator=g)


# ---- the backbone ---------------------------------------------------------------------------------------------------


def test_jvp_quadratic_equals_a_float64_finite_difference_gauss_newton_form():
    model = tiny_model("gpt2").double()  # float64 throughout (Llama's RMSNorm computes in float32 inside)
    refs, deltas = _rtn_deltas(model)
    win = _windows()
    got = fisher_measures(model, refs, deltas, win)["fisher_quad"]
    # independent reference: dz by central differences in float64, then 0.5 mean dz^T (diag p - p p^T) dz
    eps = 1e-3

    def logits(t):
        originals = [r.parameter.detach().clone() for r in refs]
        with torch.no_grad():
            for r, d in zip(refs, deltas):
                r.set_weight(r.weight + t * d)  # [out, in], whatever the storage (GPT-2's Conv1D)
            z = model(input_ids=win, use_cache=False).logits[:, :-1].double()
            for r, w in zip(refs, originals):
                r.parameter.copy_(w)
        return z

    z0 = logits(0.0)
    dz = (logits(eps) - logits(-eps)) / (2 * eps)
    p = torch.softmax(z0, -1)
    quad = ((p * dz * dz).sum(-1) - (p * dz).sum(-1) ** 2).mean()
    assert got == pytest.approx(0.5 * float(quad), rel=1e-6)


def test_kl_is_half_the_fisher_quadratic_to_second_order():
    model = tiny_model("gpt2").double()
    refs, deltas = _rtn_deltas(model)
    win = _windows()
    quad = fisher_measures(model, refs, deltas, win)["fisher_quad"]
    for t in (1e-2, 3e-3):
        kl = fisher_measures(model, refs, [t * d for d in deltas], win)["kl_calib"]
        assert kl / (t * t * quad) == pytest.approx(1.0, abs=30 * t)  # the cubic term shrinks like t


def test_fisher_measures_leave_the_model_unchanged():
    model = tiny_model("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refs, deltas = _rtn_deltas(model, "int3")
    out = fisher_measures(model, refs, deltas, _windows(2))
    assert out["kl_calib"] > 0 and 0 < out["top1_calib"] <= 1 and out["fp_entropy_calib"] > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kfac_quadratic_equals_an_explicit_kronecker_product():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 5, 7
    d = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    xa = torch.randn(20, in_f, generator=g, dtype=torch.float64)
    xg = torch.randn(20, out_f, generator=g, dtype=torch.float64)
    a, gg = xa.T @ xa / 20, xg.T @ xg / 20
    full, diag = kfac_quadratic(d, a, gg)
    # vec is row-major here: vec(dW) = dW.flatten() pairs (o, i) with index o * in + i, so F = G (x) A
    vec = d.flatten()
    assert full == pytest.approx(0.5 * float(vec @ torch.kron(gg, a) @ vec), rel=1e-12)
    assert diag == pytest.approx(0.5 * float(vec @ torch.kron(torch.diag(torch.diagonal(gg)), a) @ vec), rel=1e-12)


def test_profile_factors_are_moments_of_inputs_and_sampled_output_gradients():
    model = tiny_model("gpt2").double()
    win = _windows(2)
    prof = measure_profile(model, win, seed=0)
    ref = arch.linear_layers(model)[0]
    xs = []
    h = ref.module.register_forward_hook(lambda m, a, o: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=win, use_cache=False)
    h.remove()
    x = torch.cat(xs)
    torch.testing.assert_close(prof.input_moment[ref.name], (x.T @ x / x.shape[0]).double(), rtol=1e-6, atol=1e-9)
    for name in prof.names:
        g = prof.output_fisher[name]
        assert torch.allclose(g, g.T) and torch.linalg.eigvalsh(g).min() > -1e-9  # a second moment: PSD
    assert prof.tokens == 2 * 15 and prof.fp_entropy > 0


def test_profile_shares_the_input_moment_of_layers_fed_by_one_tensor():
    model = tiny_model("llama")
    prof = measure_profile(model, _windows(2))
    a = prof.input_moment
    blk = "model.layers.0."
    assert a[blk + "self_attn.q_proj"] is a[blk + "self_attn.k_proj"] is a[blk + "self_attn.v_proj"]
    assert a[blk + "mlp.gate_proj"] is a[blk + "mlp.up_proj"]
    distinct = {id(a[blk + n]) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert len(distinct) == 4 and a[blk + "mlp.down_proj"].dtype == torch.float32


def test_kfac_tracks_the_exact_quadratic_on_a_tiny_model():
    from quantpredict.features.fisher import price_deltas

    model = tiny_model("llama").double()
    win = _windows(4, 32)
    refs, deltas = _rtn_deltas(model, "int4")
    exact = fisher_measures(model, refs, deltas, win)["fisher_quad"]
    prof = measure_profile(model, win, seed=0, label_samples=4)
    priced = price_deltas(prof, [r.name for r in refs], deltas)["kfac_quad"]
    assert 0.5 < priced / exact < 2.0  # two approximations (block-diagonal, Kronecker), not an identity


# ---- the laws on synthetic runs --------------------------------------------------------------------------------------


def synthetic_runs(n_models=8, n_recipes=24, seed=0, noise=0.05):
    """Runs whose KLD is exactly 0.9 * fisher_quad^1.02 (times log-normal noise of ``noise``), delta NLL 1.3 * KLD and
    1 - top1 = 0.8 sqrt(KLD): what the laws should recover."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(n_models):
        ent = rng.uniform(3, 5)
        for r in range(n_recipes):
            fq = 10 ** rng.uniform(-5, -0.5)
            kld = 0.9 * fq**1.02 * np.exp(rng.normal(0, noise))
            delta = 1.3 * kld * np.exp(rng.normal(0, noise))
            fp = rng.uniform(3, 4)
            rows.append({"model": f"m{m}", "family": f"f{m % 4}", "recipe": f"r{r}", "status": "done",
                         "method": "rtn" if r % 2 else "gptq", "act_format": None, "element_is_fp": float(r % 3 == 0),
                         "fisher_quad": fq, "kl_calib": fq * np.exp(rng.normal(0, 0.01)),
                         "dnll_calib": delta * np.exp(rng.normal(0, 0.3)), "dnll_calib_se": 0.3 * delta,
                         "kfac_quad": fq * np.exp(rng.normal(0, 0.02)),
                         "token_gn_quad": fq * np.exp(rng.normal(0, 0.02)),
                         "kfac_max_layer_share": rng.uniform(0.1, 0.4), "fp_calib_nll": fp + 0.1,
                         "fp_entropy_calib": ent, "nll_fp": fp, "nll_quant": fp + delta, "delta_nll_se": delta / 50,
                         "kld": kld, "top1_agree": 1 - 0.8 * np.sqrt(kld), "ppl_fp": np.exp(fp)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["physics", "profile"])
def test_laws_recover_the_synthetic_law_and_intervals_cover(kind):
    train, test = synthetic_runs(seed=0), synthetic_runs(n_models=20, seed=1)
    p = PhysicsPredictor(kind).fit(train)
    warnings.simplefilter("ignore", OutOfRangeWarning)  # a few synthetic test rows fall just outside training
    slope = dict(zip(("1",) + p.laws["kld"].columns, p.laws["kld"].coef))["log_base"]
    assert slope == pytest.approx(1.02, abs=0.05)
    out = p.predict(test)
    rel = np.abs(out["kld"] / test["kld"] - 1)
    assert np.median(rel) < 0.06
    for t, truth in (("kld", test["kld"]), ("delta", test["nll_quant"] - test["nll_fp"]),
                     ("top1", test["top1_agree"])):
        lo, hi = (out[f"{t}_low"], out[f"{t}_high"]) if t != "delta" else (out["delta_low"], out["delta_high"])
        cover = float(np.mean((lo <= truth) & (truth <= hi)))
        assert 0.8 <= cover <= 0.99, (t, cover)
    assert np.allclose(out["ppl"], test["ppl_fp"] * np.exp(out["delta_nll"]))


def test_out_of_range_input_warns_once_and_widens_the_interval():
    p = PhysicsPredictor("physics").fit(synthetic_runs())
    row = synthetic_runs(n_models=1, n_recipes=1, seed=0)  # a training row: inside every range
    inside = p.predict(row)
    far = row.assign(fisher_quad=1e-9, kl_calib=1e-9, dnll_calib=1.2e-9)
    with pytest.warns(OutOfRangeWarning, match="outside its training range"):
        wide = p.predict(far)
    width_in = np.log(inside["kld_high"] / inside["kld_low"]).iloc[0]
    width_far = np.log(wide["kld_high"] / wide["kld_low"]).iloc[0]
    assert width_far > 1.5 * width_in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.predict(far)  # warned once per feature: the second call is silent


def test_top1_stays_a_probability_where_the_disagreement_law_extrapolates_past_one():
    p = PhysicsPredictor("physics").fit(synthetic_runs())
    warnings.simplefilter("ignore", OutOfRangeWarning)
    row = synthetic_runs(n_models=1, n_recipes=1, seed=0)
    far = row.assign(fisher_quad=50.0, kl_calib=50.0, dnll_calib=65.0)  # a 2-bit recipe: KLD of 45 nats
    out = p.predict(far).iloc[0]
    assert out["kld"] > 10
    for col in ("top1", "top1_low", "top1_high"):
        assert 0.0 <= out[col] <= 1.0, (col, out[col])
    assert out["top1_low"] <= out["top1"] <= out["top1_high"]


def test_physics_predictor_save_load_round_trip(tmp_path):
    from quantpredict.predict import Predictor

    runs = synthetic_runs()
    p = PhysicsPredictor("profile").fit(runs)
    p.save(tmp_path / "k")
    back = Predictor.load(tmp_path / "k")
    assert isinstance(back, PhysicsPredictor) and back.kind == "profile"
    pd.testing.assert_frame_equal(back.predict(runs.head(10)), p.predict(runs.head(10)))


def test_physics_predictor_errors_name_the_fix():
    from quantpredict.errors import PredictorError

    with pytest.raises(PredictorError, match="backfill"):
        PhysicsPredictor("physics").fit(synthetic_runs().drop(columns=["fisher_quad"]))
    with pytest.raises(PredictorError, match="not fitted"):
        PhysicsPredictor("profile").predict(synthetic_runs())
    with pytest.raises(PredictorError, match="unknown physics predictor kind"):
        PhysicsPredictor("nope")


# ---- rank and allocate ---------------------------------------------------------------------------------------------


def test_pareto_mask_and_recommendation_by_hand():
    bits = np.array([4.0, 4.0, 5.0, 8.0, 3.0])
    kld = np.array([0.1, 0.2, 0.05, 0.01, 0.5])
    assert pareto_mask(bits, kld).tolist() == [True, False, True, True, True]
    f = pd.DataFrame({"bits_per_element": bits, "kld": kld, "ppl": [11, 12, 10.5, 10.1, 15], "ppl_fp": [10] * 5})
    assert recommend(f, max_bits=4.5) == 0
    assert recommend(f, max_kld=0.06) == 2
    assert recommend(f, max_ppl_increase=2.0) == 3
    assert recommend(f, max_bits=2.0) is None and recommend(f) is None


def test_allocation_is_optimal_on_small_problems_and_within_budget():
    rng = np.random.default_rng(0)
    for trial in range(30):
        L, F = 5, 3
        bits = np.sort(rng.integers(2, 9, size=(L, F)).astype(float), axis=1) * rng.integers(1, 4, size=(L, 1))
        cost = np.sort(rng.exponential(1.0, size=(L, F)), axis=1)[:, ::-1] * rng.uniform(0.1, 3, size=(L, 1))
        budget = float(rng.uniform(bits.min(1).sum(), bits.max(1).sum()))
        choice, _ = solve_budget(cost, bits, budget)
        rows = np.arange(L)
        assert bits[rows, choice].sum() <= budget + 1e-9
        best = min(cost[rows, list(c)].sum() for c in itertools.product(range(F), repeat=L)
                   if bits[rows, list(c)].sum() <= budget)
        assert cost[rows, choice].sum() <= best * 1.25 + 1e-12, trial  # Lagrangian + greedy: near the optimum


def test_allocation_refuses_an_impossible_budget():
    from quantpredict.errors import RecipeError

    with pytest.raises(RecipeError, match="bit budget"):
        solve_budget(np.ones((2, 2)), np.full((2, 2), 4.0), 5.0)


def _profile_predictor():
    warnings.simplefilter("ignore", OutOfRangeWarning)
    return PhysicsPredictor("profile").fit(synthetic_runs())


def _calib_ids():
    return torch.randint(3, 320, (4000,), generator=torch.Generator().manual_seed(0))


def test_rank_recipes_end_to_end_on_a_tiny_model():
    from quantpredict.predict.rank import rank_recipes
    from quantpredict.recipe import Recipe

    model = tiny_model("llama", hidden=64)
    recipes = [Recipe(f, method=m) for f in ("mxint8", "mxint4", "mxint3", "int4") for m in ("rtn", "gptq")]
    frame = rank_recipes(model, recipes, predictor=_profile_predictor(), calib=_calib_ids(), max_bits=4.5,
                         ppl_fp=30.0)  # no tokenizer to measure the FP perplexity with: given
    assert len(frame) == 8 and frame["pareto"].any() and frame["recommended"].sum() == 1
    rec = frame[frame["recommended"]].iloc[0]
    assert rec["bits_per_element"] <= 4.5
    within = frame[frame["bits_per_element"] <= 4.5]
    assert rec["kld"] == within["kld"].min()  # the lowest predicted KLD within the budget
    assert (frame["kld_low"] <= frame["kld"]).all() and (frame["kld"] <= frame["kld_high"]).all()
    # fewer bits, more error: the priced second-order KL falls with the format's precision, per method
    rtn = frame[frame["method"] == "rtn"].set_index("weight_format")["token_gn_quad"]
    assert rtn["mxint3"] > rtn["mxint4"] > rtn["mxint8"]
    assert frame.attrs["seconds"] > 0 and frame.attrs["kept_16bit"]


def test_allocate_end_to_end_gives_a_recipe_that_quantizes():
    import copy

    from quantpredict.predict.allocate import allocate
    from quantpredict.quantize import quantize_model

    model = tiny_model("llama", hidden=64)
    res = allocate(model, 4.5, candidates=("mxint3", "mxint4", "mxint8"), predictor=_profile_predictor(),
                   calib=_calib_ids(), ppl_fp="predicted")
    assert res.best_uniform["prediction"]["kld"] > 0 and isinstance(res.uniform_better, bool)
    assert res.bits_per_element <= 4.5 + 1e-9 and res.objective <= res.best_uniform["objective"] + 1e-12
    assert len(res.recipe.layer_formats) == len(arch.linear_layers(model))
    from quantpredict.recipe import Recipe

    assert Recipe.from_label(res.recipe.label) == res.recipe
    q = copy.deepcopy(model)
    report = quantize_model(q, res.recipe, _calib_ids(), progress=False)
    assert report.effective_bits_per_param == pytest.approx(res.bits_per_element, rel=1e-9)


def test_runs_that_quantize_the_embedding_or_head_are_not_fitted():
    """Their features price the linear layers only: fitting on them would teach the laws that the embedding and head
    cost nothing. Such recipes are measured (label E=/H=) and left out of every fit."""
    runs = synthetic_runs(n_models=2, n_recipes=4)
    runs.loc[0, "recipe"] = "q4_k-rtn-L=q4_k*2-E=q4_k-H=q6_k"
    runs.loc[1, "recipe"] = "q8_0-rtn-H=q8_0"
    kept = PhysicsPredictor("profile").usable(runs)
    assert len(kept) == len(runs) - 2 and not kept["recipe"].str.contains("=").any()
