"""Recipe, RTN, GPTQ and SmoothQuant scales, tested against independent references and exact small cases."""

import json

import pytest
import torch

from quantpredict.errors import FormatError
from quantpredict.formats import compute_scale, fake_quantize, get_format, quantize_with_scale
from quantpredict.quantize import (
    Recipe,
    gptq_quantize,
    layer_output_error,
    relative_output_error,
    rtn_quantize,
    smoothing_scales,
)

# ---- Recipe ---------------------------------------------------------------------------------------------------------


def test_recipe_labels():
    assert Recipe("mxfp4_e2m1", method="gptq", smoothquant_alpha=0.5, act_format="mxint8").label == \
        "mxfp4_e2m1-gptq-sq0.5-a_mxint8"
    assert Recipe("mxint4", block_size=128).label == "mxint4_b128-rtn"
    assert Recipe("int4", block_size=64, method="gptq").label == "int4_b64-gptq"
    # the format's default block size, given explicitly, is the same recipe
    assert Recipe("mxint4", block_size=32) == Recipe("mxint4")
    assert Recipe("mxint4", block_size=32).label == "mxint4-rtn"
    full = Recipe("int3", block_size=16, method="gptq", smoothquant_alpha=0.85, act_format="mxfp8_e4m3",
                  act_block_size=16, calib_samples=32, calib_seq_len=512, gptq_blocksize=64, percdamp=0.1,
                  act_order=True, skip=("mlp.down_proj", "*.0.*"), seed=3)
    assert full.label == "int3_b16-gptq-sq0.85-a_mxfp8_e4m3_b16-ao-pd0.1-gb64-cal32x512-seed3-skipmlp.down_proj+*.0.*"


@pytest.mark.parametrize("recipe", [
    Recipe("mxint4"),
    Recipe("mxfp4_e2m1", method="gptq", smoothquant_alpha=0.5, act_format="mxint8"),
    Recipe("int4", block_size=128, method="gptq", act_order=True, percdamp=0.05),
    Recipe("mxint3", block_size=16, method="gptq", smoothquant_alpha=1 / 3, act_format="int8", calib_samples=8,
           calib_seq_len=64, gptq_blocksize=32, skip=("fc2",), seed=7),
])
def test_recipe_round_trips(recipe):
    assert Recipe.from_label(recipe.label) == recipe
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert hash(recipe) == hash(Recipe.from_label(recipe.label))


def test_recipe_validation_errors():
    with pytest.raises(FormatError, match="unknown format 'mxint17'.*valid formats: .*mxint4"):
        Recipe("mxint17")
    with pytest.raises(FormatError, match="unknown format"):
        Recipe("mxint4", act_format="nope")
    with pytest.raises(ValueError, match="unknown quantization method 'awq'.*rtn, gptq"):
        Recipe("mxint4", method="awq")
    with pytest.raises(ValueError, match=r"smoothquant_alpha must lie in \[0, 1\]"):
        Recipe("mxint4", smoothquant_alpha=1.5)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        Recipe("mxint4", smoothquant_alpha=-0.1)
    with pytest.raises(FormatError, match="block_size"):
        Recipe("mxint4", block_size=0)
    with pytest.raises(ValueError, match="unknown segment 'zz'"):
        Recipe.from_label("mxint4-rtn-zz")
    with pytest.raises(ValueError, match="unknown field"):
        Recipe.from_dict({"weight_format": "mxint4", "colour": "red"})


# ---- RTN ------------------------------------------------------------------------------------------------------------


def test_rtn_int4_per_channel_hand_computed():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.05], [1.4, 0.2, -0.2, 0.0]])
    # scale = max|row| / 7 -> 0.1 and 0.2: the rows become integers times their scale
    expected = torch.tensor([[0.7, -0.4, 0.1, 0.0], [1.4, 0.2, -0.2, 0.0]])
    torch.testing.assert_close(rtn_quantize(w, "int4"), expected)


# ---- GPTQ: independent reference ------------------------------------------------------------------------------------


def naive_gptq(W, H, fmt, group, percdamp=0.01, order=None):
    """Optimal Brain Quantization, column by column, float64, with the full inverse Hessian updated by Gaussian
    elimination after each column (no Cholesky, no lazy batches): the formulation GPTQ is proven equal to."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = list(range(n)) if order is None else list(order)
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    row_scale = compute_scale(W.float(), fmt, block_size=None) if group is None else None
    scales = {}
    remaining = list(order)
    for col in order:
        if group is None:
            s = row_scale
        else:
            g = col // group
            if g not in scales:
                scales[g] = compute_scale(W[:, g * group:(g + 1) * group].float(), fmt, block_size=group)
            s = scales[g]
        q = quantize_with_scale(W[:, col : col + 1].float(), fmt, s).double().flatten()
        err = (W[:, col] - q) / Hinv[col, col]
        rest = torch.tensor(remaining)
        W[:, rest] -= err.unsqueeze(1) * Hinv[col, rest].unsqueeze(0)
        W[:, col] = q
        Hinv = Hinv - Hinv[:, col : col + 1] @ Hinv[col : col + 1, :] / Hinv[col, col]
        remaining.remove(col)
    return W


def correlated_hessian(n, tokens=2048, seed=0):
    """H = 2/N X^T X of strongly correlated inputs with a few outlier channels (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    X += 0.3 * torch.randn(tokens, n, generator=g)
    X[:, :3] *= 8.0
    return (2.0 / tokens) * X.double().T @ X.double()


@pytest.mark.parametrize("fmt,group,blocksize,act_order", [
    ("int4", None, 16, False),     # per-channel, lazy batches of 16
    ("mxint4", 8, 5, False),       # groups straddle lazy batches: pending updates must be applied when fitting
    ("int4", 8, 5, False),         # (INT group scales are not powers of two: they show any missed update)
    ("mxfp4_e2m1", 8, 16, False),
    ("mxint4", 8, 16, True),       # act_order with groups in original column order
    ("int4", 8, 7, True),
])
def test_gptq_matches_naive_obq(fmt, group, blocksize, act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 40, generator=g)
    H = correlated_hessian(40)
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else None
    ref = naive_gptq(W, H, fmt, group, order=order)
    got = gptq_quantize(W, H, fmt, block_size=group, blocksize=blocksize, act_order=act_order)
    assert got.dtype == W.dtype and got.shape == W.shape
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt,block_size", [
    ("int4", None), ("int3", 16), ("mxint4", None), ("mxfp4_e2m1", None), ("mxint8", None), ("fp8_e4m3", None),
    ("bf16", None),
])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_diagonal_hessian_is_rtn(fmt, block_size, act_order):
    # a diagonal H couples no columns: nothing propagates and GPTQ must reduce to RTN exactly; with distinct
    # diagonal entries act_order really permutes, so this also checks that the permutation is undone
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) + 0.5).double()
    assert torch.equal(gptq_quantize(W, H, fmt, block_size=block_size, act_order=act_order),
                       rtn_quantize(W, fmt, block_size=block_size))
    assert torch.equal(gptq_quantize(W, torch.eye(64), fmt, block_size=block_size), rtn_quantize(W, fmt,
                                                                                                 block_size=block_size))


@pytest.mark.parametrize("fmt", ["mxint4", "mxfp4_e2m1", "int4", "mxint3", "mxint8", "mxfp8_e4m3", "fp8_e4m3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(fmt, act_order):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 96, generator=g)
    H = correlated_hessian(96)
    rtn = layer_output_error(W, rtn_quantize(W, fmt), H)
    q = gptq_quantize(W, H, fmt, act_order=act_order)
    gptq = layer_output_error(W, q, H)
    assert gptq < 0.7 * rtn, (fmt, gptq, rtn)


@pytest.mark.parametrize("fmt", ["mxint4", "mxfp4_e2m1", "mxint3", "mxfp6_e3m2", "mxfp8_e4m3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_mx_output_on_grid(fmt, act_order):
    W = torch.randn(8, 80, generator=torch.Generator().manual_seed(4))  # 80 = 2 full blocks of 32 + a short one
    q = gptq_quantize(W, correlated_hessian(80), fmt, act_order=act_order)
    assert torch.equal(fake_quantize(q, fmt), q)  # idempotent: already on the grid


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_int_per_channel_on_grid_of_row_scale(act_order):
    W = torch.randn(8, 48, generator=torch.Generator().manual_seed(5))
    q = gptq_quantize(W, correlated_hessian(48), "int4", act_order=act_order)
    scale = W.abs().amax(dim=1, keepdim=True) / 7  # the per-channel scale is fitted once, on the whole row
    k = q / scale
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert k.abs().max() <= 7 + 1e-4


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dead_columns(act_order):
    n = 24
    H = correlated_hessian(n)
    dead = torch.tensor([0, 5, 6, 23])
    H[dead, :] = 0
    H[:, dead] = 0
    W = torch.randn(10, n, generator=torch.Generator().manual_seed(6))
    q = gptq_quantize(W, H, "int4", percdamp=0.0, act_order=act_order)
    assert torch.count_nonzero(q[:, dead]) == 0
    # the live columns solve the problem without the dead ones (per-channel scale of the row with them zeroed)
    live = torch.tensor([i for i in range(n) if i not in set(dead.tolist())])
    W_live = W.clone()
    W_live[:, dead] = 0
    ref = naive_gptq(W_live[:, live], H[live][:, live], "int4", None, percdamp=0.0,
                     order=torch.argsort(torch.diag(H[live][:, live]), descending=True).tolist() if act_order else None)
    torch.testing.assert_close(q[:, live].double(), ref, rtol=0, atol=1e-5)
    # and MX: dead columns are zero too
    assert torch.count_nonzero(gptq_quantize(W, H, "mxint4", block_size=8)[:, dead]) == 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt,block", [("int4", None), ("mxint4", 8), ("q8_0", None)])
def test_gptq_with_a_precomputed_factor_is_the_same(fmt, block, act_order):
    """hessian_inverse_factor depends on the Hessian, percdamp and act_order alone: passed in, it gives the same
    weights bit for bit (dead columns included), for the plain and the shipped-layout paths."""
    from quantpredict.quantize.gptq import hessian_inverse_factor

    n = 64
    H = correlated_hessian(n)
    H[3, :] = H[:, 3] = 0  # a dead input
    W = torch.randn(12, n, generator=torch.Generator().manual_seed(7))
    factor = hessian_inverse_factor(H, 0.02, act_order)
    want = gptq_quantize(W, H, fmt, block_size=block, percdamp=0.02, act_order=act_order)
    got = gptq_quantize(W, H, fmt, block_size=block, percdamp=0.02, act_order=act_order, inverse_factor=factor)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_inverse_factor_is_its_definition_and_leaves_the_hessian_alone(act_order, dtype):
    """The factor U (upper, H^-1 = U^T U) of the damped, dead-fixed, reordered H, against a float64
    re-computation from the definition (torch.linalg.inv, not the Cholesky route); the caller's H is not changed
    (the factorisation works in place on its own copy)."""
    from quantpredict.quantize.gptq import hessian_inverse_factor

    n = 48
    H = correlated_hessian(n).to(dtype)
    H[5, :] = H[:, 5] = 0  # a dead input
    before = H.clone()
    U = hessian_inverse_factor(H, 0.05, act_order)
    assert torch.equal(H, before)
    ref = H.double().clone()
    ref[5, 5] = 1.0
    ref += 0.05 * torch.diag(ref).mean() * torch.eye(n, dtype=torch.float64)
    if act_order:
        perm = torch.argsort(torch.diag(ref), descending=True)
        ref = ref[perm][:, perm]
    inv = torch.linalg.inv(ref)
    assert U.dtype == torch.float32 and torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.double().T @ U.double(), inv, rtol=1e-5, atol=1e-6 * inv.abs().max().item())


@pytest.mark.parametrize("fmt,block", [("int4", None), ("mxint4", 32), ("mxfp4_e2m1", 32), ("int8", 16),
                                       ("fp8_e4m3", None), ("bf16", None)])
def test_stacked_gptq_is_each_layers_gptq_alone(fmt, block):
    """gptq_quantize_stacked of three layers (own Hessians, each with a different dead input) is gptq_quantize of
    each alone, bit for bit; a shipped layout and disagreeing shapes are refused."""
    from quantpredict.quantize.gptq import gptq_quantize_stacked, hessian_inverse_factor

    n = 64
    hs, ws = [], []
    for b in range(3):
        H = correlated_hessian(n, seed=b)
        H[4 + b, :] = H[:, 4 + b] = 0
        hs.append(H)
        ws.append(torch.randn(20, n, generator=torch.Generator().manual_seed(10 + b)))
    factors = torch.stack([hessian_inverse_factor(h, 0.01) for h in hs])
    diags = torch.stack([torch.diag(h) for h in hs])
    got = gptq_quantize_stacked(torch.stack(ws), diags, factors, fmt, block_size=block, blocksize=16)
    for b in range(3):
        assert torch.equal(got[b], gptq_quantize(ws[b], hs[b], fmt, block_size=block, blocksize=16))
    with pytest.raises(ValueError, match="single-scale formats only"):
        gptq_quantize_stacked(torch.stack(ws), diags, factors, "uint4", block_size=16)
    with pytest.raises(ValueError, match="must agree"):
        gptq_quantize_stacked(torch.stack(ws), diags[:2], factors, fmt, block_size=block)


def test_gptq_keeps_dtype_and_bad_inputs():
    W = torch.randn(4, 8, dtype=torch.bfloat16)
    assert gptq_quantize(W, torch.eye(8), "mxint8", block_size=8).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"hessian must be \[in, in\] = \[8, 8\]"):
        gptq_quantize(W, torch.eye(7), "mxint4")
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, H, "mxint4")
    with pytest.raises(FormatError, match="unknown format"):
        gptq_quantize(W, torch.eye(8), "int99")
    with pytest.raises(ValueError, match="not positive definite.*percdamp"):
        gptq_quantize(W, -torch.eye(8), "int4")


def test_gptq_restores_thread_count():
    before = torch.get_num_threads()
    gptq_quantize(torch.randn(4, 8), torch.eye(8), "int4")
    assert torch.get_num_threads() == before


def test_output_error_is_squared_output_difference():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(100, 6, generator=g, dtype=torch.float64)
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    Q = W + 0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    H = 2.0 / 100 * X.T @ X
    expected = 2.0 / 100 * ((X @ (Q - W).T) ** 2).sum()
    assert layer_output_error(W, Q, H) == pytest.approx(float(expected), rel=1e-12)
    assert relative_output_error(W, Q, H) == pytest.approx(float(((X @ (Q - W).T) ** 2).sum() / ((X @ W.T) ** 2).sum()),
                                                           rel=1e-12)


# ---- SmoothQuant scales ---------------------------------------------------------------------------------------------


def test_smoothing_scales_hand_computed():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -0.25, 1.0, 0.5], [-0.5, 0.0, 2.0, 0.0]])
    w2 = torch.tensor([[0.25, 1.0, 0.0, -4.0]])
    # max|W_j| over all rows of both: [1, 1, 2, 4]; s = sqrt(act / wmax), the zero channel clamped to 1e-5
    s = smoothing_scales(act, [w1, w2], 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1e-5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(smoothing_scales(act, [w1, w2], 1.0), torch.tensor([4.0, 1, 1e-5, 9],
                                                                                  dtype=torch.float64))
    torch.testing.assert_close(smoothing_scales(act, [w1, w2], 0.0), torch.tensor([1.0, 1, 0.5, 0.25],
                                                                                  dtype=torch.float64))


def test_format_defaults_used_by_recipes():
    assert Recipe("mxint4").weight_block_size == 32 == get_format("mxint4").default_block_size
    assert Recipe("int4").weight_block_size is None
    assert Recipe("int4", act_format="mxint8").act_block == 32
