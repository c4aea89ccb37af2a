"""QAT: STE gradients, weights on the grid, NLL goes down, same calibration windows as GPTQ, the local objective."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from quantpredict import arch
from quantpredict.formats import fake_quantize
from quantpredict.qat import (
    attach_weight_ste,
    detach_weight_ste,
    finetune,
    fp_reference,
    local_objective,
    ptq_trajectory,
    qat_label,
    weight_distance,
)
from quantpredict.quantize import Recipe, quantize_model


def _windows(n=8, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


def _structured_ids(n_tokens=4000, seed=0):
    """1-D ids with learnable structure (a noisy repeating pattern), so that a few FP steps give a real model."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, VOCAB, (17,), generator=g)
    ids = base.repeat(n_tokens // 17 + 1)[:n_tokens].clone()
    noise = torch.rand(n_tokens, generator=g) < 0.1
    ids[noise] = torch.randint(3, VOCAB, (int(noise.sum()),), generator=g)
    return ids


@pytest.fixture(scope="module")
def trained_llama():
    """A tiny Llama trained for a few FP steps on structured ids (quantizing a random model changes little)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = _structured_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        starts = torch.randint(0, ids.numel() - 32, (8,), generator=g)
        batch = torch.stack([ids[s : s + 32] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids


def _on_grid(model, recipe):
    for ref in arch.linear_layers(model):
        w = ref.weight.detach()
        assert torch.equal(fake_quantize(w, recipe.weight_format, block_size=recipe.weight_block_size), w), ref.name


# ---- STE -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D stores [in, out]
def test_ste_forward_is_quantized_and_gradient_is_straight_through(family):
    model = tiny_model(family, seed=1)
    ref_model = copy.deepcopy(model)
    x = _windows(4, 16)
    refs = arch.linear_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    latents = attach_weight_ste(refs, "int3", None)
    for p in latents:
        p.requires_grad_(True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()

    # independent reference: a plain model holding Q(W), differentiated w.r.t. its (quantized) weights
    rrefs = arch.linear_layers(ref_model)
    for r in rrefs:
        r.set_weight(fake_quantize(r.weight.detach(), "int3"))
    ref_loss = ref_model(input_ids=x, labels=x).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for lat, r in zip(latents, rrefs):
        assert lat.grad is not None and lat.grad.abs().sum() > 0, r.name
        # STE: d loss / d latent == d loss / d Q(latent), in the stored layout
        assert torch.allclose(lat.grad, r.parameter.grad, rtol=1e-5, atol=1e-7), r.name

    detach_weight_ste(refs)
    for r in arch.linear_layers(model):
        assert not torch.nn.utils.parametrize.is_parametrized(r.module)
    _on_grid(model, Recipe("int3"))


# ---- finetune ------------------------------------------------------------------------------------------------------


def test_finetune_lowers_calibration_nll_of_rtn_model_and_returns_weights_on_grid(trained_llama):
    fp, ids = trained_llama
    model = copy.deepcopy(fp)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    recipe = Recipe("int2", calib_samples=16, calib_seq_len=32)
    res = finetune(model, recipe, ids, steps=40, lr=3e-3, batch_size=4, init="rtn", progress=False,
                   track_every=10)
    assert res.calib_nll_before > res.calib_nll_fp + 0.05  # int2 RTN hurts this model
    assert res.calib_nll_after < res.calib_nll_before - 0.05
    assert len(res.losses) == 40 and res.calib_windows == 16 and res.calib_tokens == 16 * 32
    assert res.start_mismatch == 0.0  # RTN init: the first forward is exactly RTN
    assert res.changed_fraction > 0
    assert [p.step for p in res.trajectory] == [0, 10, 20, 30, 40]
    assert res.label == "int2-qat-cal16x32-qs40-qlr0.003-qbs4"  # the QAT settings are part of what was done
    _on_grid(model, recipe)
    # only the quantized weights trained; every parameter is trainable again as before
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(torch.nn.utils.parametrize.is_parametrized(r.module) for r in arch.linear_layers(model))
    # the recorded calibration NLL is the returned model's
    from quantpredict.data import calibration_windows
    from quantpredict.qat import mean_nll

    w = calibration_windows(ids, 16, 32, seed=0)
    assert mean_nll(model, w) == pytest.approx(res.calib_nll_after, abs=1e-9)


@pytest.mark.parametrize("fmt", ["mxint4", "mxfp4_e2m1", "int3"])
def test_zero_steps_returns_exactly_the_ptq_model_on_the_same_windows(trained_llama, fmt):
    """steps=0: the init's PTQ model, built on the same calibration windows GPTQ gets from the same 1-D ids."""
    fp, ids = trained_llama
    recipe = Recipe(fmt, calib_samples=6, calib_seq_len=32, seed=3)
    for init in ("rtn", "gptq"):
        qat_model = copy.deepcopy(fp)
        res = finetune(qat_model, recipe, ids, steps=0, init=init, progress=False)
        ptq_model = copy.deepcopy(fp)
        quantize_model(ptq_model, Recipe(fmt, method=init, calib_samples=6, calib_seq_len=32, seed=3), ids,
                       progress=False)
        for a, b in zip(arch.linear_layers(qat_model), arch.linear_layers(ptq_model)):
            if res.start_mismatch == 0.0:
                assert torch.equal(a.weight, b.weight), (init, a.name)
        if fmt.startswith("mx"):
            assert res.start_mismatch == 0.0
        assert res.losses == ()
        if res.start_mismatch == 0.0:
            assert res.calib_nll_after == pytest.approx(res.calib_nll_before, abs=1e-6)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_finetune_every_family_on_grid(family):
    model = tiny_model(family, seed=2)
    recipe = Recipe("mxint4", calib_samples=4, calib_seq_len=16)
    res = finetune(model, recipe, _windows(4, 16), steps=3, lr=1e-2, batch_size=2, init="gptq", progress=False)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    _on_grid(model, recipe)


def test_finetune_with_activation_quant_keeps_gradients_and_reinstalls_hooks():
    from quantpredict.quantize import has_act_quant

    model = tiny_model("llama", seed=3)
    recipe = Recipe("mxint4", act_format="mxint8", calib_samples=4, calib_seq_len=16)
    res = finetune(model, recipe, _windows(4, 16), steps=4, lr=1e-2, batch_size=2, progress=False)
    assert res.changed_fraction > 0  # gradients reached the layers below the quantized activations
    assert all(has_act_quant(r.module) for r in arch.linear_layers(model))


def test_finetune_rejects_bad_input():
    from quantpredict.errors import ModelError

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown QAT init"):
        finetune(model, Recipe("int4"), _windows(), steps=1, init="awq", progress=False)
    with pytest.raises(ModelError, match="float32"):
        finetune(model.to(torch.bfloat16), Recipe("int4"), _windows(), steps=1, progress=False)


# ---- local objective and trajectories --------------------------------------------------------------------------------


def test_local_objective_equals_summed_layer_output_error(trained_llama):
    """tr(dW H dW^T) summed over layers == 2/N sum ||dW X||^2 with X the FP inputs, computed in float64 by hand."""
    fp, ids = trained_llama
    windows = _windows(3, 20)
    names = [r.name for r in arch.linear_layers(fp)]
    ref = fp_reference(fp, names, windows)
    q = copy.deepcopy(fp)
    quantize_model(q, Recipe("int3", calib_samples=4, calib_seq_len=20), windows, progress=False)

    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [r.module.register_forward_pre_hook(lambda m, a, n=r.name: inputs[n].append(a[0].detach()))
             for r in arch.linear_layers(fp)]
    with torch.no_grad():
        fp(input_ids=windows)
    for h in hooks:
        h.remove()
    fp_w = {r.name: r.weight.detach().double() for r in arch.linear_layers(fp)}
    expected = 0.0
    for r in arch.linear_layers(q):
        x = torch.cat(inputs[r.name]).reshape(-1, r.in_features).double()
        dw = r.weight.detach().double() - fp_w[r.name]
        expected += 2.0 / x.shape[0] * float((x @ dw.T).pow(2).sum())
    local, rel = local_objective(q, ref)
    assert local == pytest.approx(expected, rel=1e-5)  # the Hessian's x^T x is formed in float32
    assert 0 < rel < 1
    dist, dist_rel = weight_distance(q, ref)
    by_hand = sum(float((r.weight.detach().double() - fp_w[r.name]).pow(2).sum()) for r in arch.linear_layers(q))
    assert dist == pytest.approx(by_hand**0.5, rel=1e-12) and 0 < dist_rel < 1


def _gptq_int3_and_reference(fp):
    """Three windows, the layer names, the FP reference on them and an int3 GPTQ copy of ``fp``."""
    windows = _windows(3, 20)
    names = [r.name for r in arch.linear_layers(fp)]
    ref = fp_reference(fp, names, windows)
    q = copy.deepcopy(fp)
    quantize_model(q, Recipe("int3", method="gptq", calib_samples=4, calib_seq_len=20), windows, progress=False)
    return windows, names, ref, q


def test_ptq_trajectory_goes_from_fp_to_the_ptq_model(trained_llama):
    from quantpredict.qat import mean_nll

    fp, ids = trained_llama
    windows, names, ref, q = _gptq_int3_and_reference(fp)
    traj = ptq_trajectory(fp, q, ref, windows)
    assert [p.step for p in traj] == list(range(len(names) + 1))
    assert traj[0].local == 0.0 and traj[0].distance == 0.0
    assert traj[0].nll == pytest.approx(mean_nll(fp, windows), abs=1e-9)
    assert traj[-1].nll == pytest.approx(mean_nll(q, windows), abs=1e-6)
    assert traj[-1].local == pytest.approx(local_objective(q, ref)[0], rel=1e-9)
    # layers add their (FP-input) errors one at a time: the local objective never decreases along the replay
    assert all(b.local >= a.local for a, b in zip(traj, traj[1:]))


def test_block_trajectory_keeps_the_layer_paths_numbers_at_block_ends(trained_llama):
    """points="block": the steps that end a block, with exactly the per-layer path's numbers there."""
    fp, _ = trained_llama
    windows, names, ref, q = _gptq_int3_and_reference(fp)
    full = {p.step: p for p in ptq_trajectory(fp, q, ref, windows)}
    blocks = ptq_trajectory(fp, q, ref, windows, points="block")
    per_block = [r.block_index for r in arch.linear_layers(fp)]
    ends = [0] + [k + 1 for k in range(len(names)) if k + 1 == len(names) or per_block[k + 1] != per_block[k]]
    assert [p.step for p in blocks] == ends and len(ends) == len(arch.blocks(fp)) + 1
    for p in blocks:
        assert p == full[p.step]
    with pytest.raises(ValueError, match="unknown trajectory points"):
        ptq_trajectory(fp, q, ref, windows, points="head")


def test_reference_shares_equal_hessians_and_float32_agrees(trained_llama):
    fp, _ = trained_llama
    windows = _windows(3, 20)
    names = [r.name for r in arch.linear_layers(fp)]
    ref = fp_reference(fp, names, windows)
    q_name, k_name = (n for n in names if n.endswith(("q_proj", "k_proj")) and ".0." in n)
    assert ref.hessians[q_name] is ref.hessians[k_name]  # one input, one tensor
    ref32 = fp_reference(fp, names, windows, dtype=torch.float32)
    assert all(ref32.hessians[n].dtype == torch.float32 and ref32.weights[n].dtype == torch.float32 for n in names)
    q = copy.deepcopy(fp)
    quantize_model(q, Recipe("int3", calib_samples=4, calib_seq_len=20), windows, progress=False)
    assert local_objective(q, ref32)[0] == pytest.approx(local_objective(q, ref)[0], rel=1e-5)
    assert weight_distance(q, ref32)[0] == pytest.approx(weight_distance(q, ref)[0], rel=1e-6)
    assert ref32.energy == pytest.approx(ref.energy, rel=1e-5)
    shared = fp_reference(fp, names, windows, dtype=torch.float32, share_weights=True)
    first = arch.linear_layers(fp)[0]
    assert shared.weights[first.name].data_ptr() == first.weight.data_ptr()  # a view, not a copy
    assert ref32.weights[first.name].data_ptr() != first.weight.data_ptr()


def test_micro_batches_give_the_same_gradient(trained_llama):
    """Gradient accumulation over micro-batches of equally long windows: the batch's loss and gradient, up to
    float rounding (not bit for bit, and AdamW's first steps, ~lr * sign(g), turn a rounding-level difference of a
    near-zero gradient into a full step: the trained weights are compared through the loss curve only)."""
    from quantpredict.qat.finetune import _loss_and_backward

    fp, ids = trained_llama
    batch = ids[: 4 * 32].view(4, 32)
    grads, losses = [], []
    for micro in (None, 1, 3):
        model = copy.deepcopy(fp)
        losses.append(_loss_and_backward(model, batch, micro))
        grads.append([p.grad.clone() for p in model.parameters()])
    for loss, g in zip(losses[1:], grads[1:]):
        assert loss == pytest.approx(losses[0], rel=1e-6)
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    recipe = Recipe("int3", calib_samples=8, calib_seq_len=32)
    curves = [finetune(copy.deepcopy(fp), recipe, ids, steps=4, lr=3e-3, batch_size=4, progress=False,
                       micro_batch_size=m).losses for m in (None, 2)]
    assert curves[1][0] == pytest.approx(curves[0][0], rel=1e-6)  # the same first minibatch and weights
    assert curves[1] == pytest.approx(curves[0], rel=1e-2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        finetune(copy.deepcopy(fp), recipe, ids, steps=1, progress=False, micro_batch_size=0)


# ---- run store and CLI ---------------------------------------------------------------------------------------------


def test_qat_methods_in_run_specs():
    from quantpredict.runs import RunSpec

    spec = RunSpec(model="llama-xs", weight_format="mxint4", method="qat", block_size=32)
    assert spec.label == "mxint4-qat"
    assert spec.recipe().method == "rtn"
    gspec = RunSpec(model="llama-xs", weight_format="int3", method="qat_gptq", block_size=128)
    assert gspec.label == "int3_b128-qat_gptq" and gspec.recipe().method == "gptq"
    assert qat_label(Recipe("int3", block_size=128, calib_samples=8), "gptq") == "int3_b128-qat_gptq-cal8x256"


def test_cli_qat_saves_a_loadable_quantized_model(tiny_hf_dir, tmp_path, capsys):
    import json

    from quantpredict.cli import main
    from quantpredict.models import load
    from quantpredict.quantize import read_quantization

    out = tmp_path / "q"
    rc = main(["qat", str(tiny_hf_dir), "--format", "mxint4", "--steps", "2", "--batch-size", "2",
               "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0
    assert "mxint4-qat-cal4x32" in capsys.readouterr().out
    saved = read_quantization(out)
    assert saved.extra["label"] == "mxint4-qat-cal4x32-qs2-qbs2" and len(saved.extra["qat"]["losses"]) == 2
    model, _ = load(out)
    _on_grid(model, saved.recipe)
    assert json.loads((out / "quantization.json").read_text())["qat"]["qat_steps"] == 2
    assert main(["qat", str(tiny_hf_dir), "--format", "mxint17", "--out", str(out)]) == 2


def test_fp_finetune_is_qats_training_without_quantization(trained_llama):
    """The FP control trains exactly the layers QAT trains, with QAT's optimizer, schedule, minibatch order and
    clipping: equal to an independent hand-written loop, with the embeddings and norms untouched."""
    from quantpredict.data import calibration_windows
    from quantpredict.qat import QATConfig
    from quantpredict.qat.finetune import fp_finetune

    fp, ids = trained_llama
    recipe = Recipe("int4", calib_samples=8, calib_seq_len=24, seed=3)
    cfg = QATConfig(steps=5, lr=1e-3, batch_size=3, init="gptq", seed=2, track_every=2)
    model = copy.deepcopy(fp)
    losses = fp_finetune(model, recipe, ids, config=cfg)

    ref = copy.deepcopy(fp)
    weights = [r.module.weight for r in arch.linear_layers(ref)]
    for p in ref.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    windows = calibration_windows(ids, 8, 24, seed=3)
    opt = torch.optim.AdamW(weights, lr=1e-3, weight_decay=cfg.weight_decay)
    gen, order, hand = torch.Generator().manual_seed(2), torch.empty(0, dtype=torch.long), []
    for step in range(5):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 5))
        if order.numel() < 3:
            order = torch.cat([order, torch.randperm(8, generator=gen)])
        idx, order = order[:3], order[3:]
        loss = ref(input_ids=windows[idx], labels=windows[idx]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, cfg.grad_clip)
        opt.step()
        hand.append(float(loss.detach()))
    assert losses == pytest.approx(hand, rel=1e-6)
    for (name, a), (_, b), (_, c) in zip(model.named_parameters(), ref.named_parameters(), fp.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert torch.equal(a, c) != any(name == f"{r.name}.weight" for r in arch.linear_layers(model)), name
    assert all(p.requires_grad for p in model.parameters())  # flags restored
