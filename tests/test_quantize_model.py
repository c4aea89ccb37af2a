"""quantize_model, SmoothQuant on real blocks, activation fake-quant, Hessian capture, save/load and the CLI."""

import json
import math

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch import nn

from quantpredict import arch
from quantpredict.errors import DataError, UnsupportedArchitectureError
from quantpredict.formats import fake_quantize, get_format
from quantpredict.quantize import (
    Recipe,
    apply_smoothing,
    capture_linear_inputs,
    collect_hessians,
    install_act_quant,
    quantize_model,
    quantized_linears,
    read_quantization,
    remove_act_quant,
    sample_calibration,
    save_quantized,
    size_report,
    smoothing_scales,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run thousands of small ops: with 2 intra-op threads on this shared 2-core machine, each waits for
    the other thread to be scheduled (4x the wall time measured), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _outlier_model(family):
    """A tiny model whose norms have a few outlier channels, so SmoothQuant's scales are far from 1."""
    model = tiny_model(family)
    with torch.no_grad():
        for i in range(len(arch.blocks(model))):
            for pair in arch.smooth_pairs(model, i):
                pair.norm.weight[:3] *= 20.0
    return model


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothquant_preserves_outputs(any_family, token_windows, alpha):
    model = _outlier_model(any_family)
    with torch.no_grad():
        ref = model(token_windows).logits
        for i in range(len(arch.blocks(model))):
            pairs = arch.smooth_pairs(model, i)
            with capture_linear_inputs([p.linears[0] for p in pairs], hessian=False) as stats:
                model(token_windows)
            for pair in pairs:
                s = smoothing_scales(stats[pair.linears[0].name].absmax, [r.weight for r in pair.linears], alpha)
                assert s.max() / s.min() > 3  # a real migration, not a no-op
                apply_smoothing(pair, s)
        out = model(token_windows).logits
    assert _rel(out, ref) < 1e-5


def test_smoothquant_inside_quantize_model_preserves_outputs(any_family, token_windows):
    # skip every linear: quantize_model then only smooths, which must not change the function
    model = _outlier_model(any_family)
    with torch.no_grad():
        ref = model(token_windows).logits
    norm_before = arch.smooth_pairs(model, 0)[0].norm.weight.clone()
    report = quantize_model(model, Recipe("mxint4", smoothquant_alpha=0.5, skip=("*",)), token_windows,
                            progress=False)
    assert report.layers == () and report.quantized_params == 0
    assert not torch.equal(arch.smooth_pairs(model, 0)[0].norm.weight, norm_before)
    with torch.no_grad():
        assert _rel(model(token_windows).logits, ref) < 1e-5


@pytest.mark.parametrize("family,fmt", [("llama", "mxint4"), ("opt", "int4"), ("gpt2", "mxint3"),
                                        ("gpt_neox", "mxint4")])
def test_quantize_model_gptq_runs_and_beats_rtn(family, fmt, token_windows):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(token_windows).logits
    report = quantize_model(model, Recipe(fmt, method="gptq"), token_windows, progress=False)
    refs = arch.linear_layers(model)
    assert [r.name for r in report.layers] == [r.name for r in refs]
    for row in report.layers:
        assert 0 < row.rel_weight_error < 0.5 and row.seconds >= 0
        assert row.output_error <= row.output_error_rtn * 1.0001  # GPTQ's own objective, in sample
    assert sum(r.output_error for r in report.layers) < 0.8 * sum(r.output_error_rtn for r in report.layers)
    if fmt.startswith("mx"):
        for r in refs:
            assert torch.equal(fake_quantize(r.weight, fmt), r.weight)  # weights stored on the grid
    with torch.no_grad():
        out = model(token_windows).logits
    assert 0 < _rel(out, ref) < 0.5
    assert report.calibration_tokens == token_windows.numel()


def test_quantize_model_rtn_bf16_changes_nothing_much(any_family, token_windows):
    model = tiny_model(any_family)
    before = {r.name: r.weight.detach().clone() for r in arch.linear_layers(model)}
    with torch.no_grad():
        ref = model(token_windows).logits
    report = quantize_model(model, Recipe("bf16"), token_windows, progress=False)
    for r in arch.linear_layers(model):
        assert torch.equal(r.weight, before[r.name].to(torch.bfloat16).float())
    with torch.no_grad():
        assert _rel(model(token_windows).logits, ref) < 5e-3
    assert report.effective_bits_per_param == 16.0
    assert report.compression_ratio == pytest.approx(1.0)


def test_quantize_model_act_order_and_skip(token_windows):
    model = tiny_model("llama")
    untouched = arch.block_linears(model, 0)[6].weight.detach().clone()  # model.layers.0.mlp.down_proj
    recipe = Recipe("mxfp4_e2m1", method="gptq", act_order=True, skip=("layers.0.mlp.down_proj",))
    report = quantize_model(model, recipe, token_windows, progress=False)
    assert "model.layers.0.mlp.down_proj" not in {r.name for r in report.layers}
    assert len(report.layers) == len(arch.linear_layers(model)) - 1
    assert torch.equal(arch.block_linears(model, 0)[6].weight, untouched)


def test_act_quant_hooks_quantize_inputs_and_come_off(token_windows):
    model = tiny_model("opt")
    with torch.no_grad():
        ref = model(token_windows).logits
    recipe = Recipe("mxint4", act_format="mxint4", act_block_size=8)
    handle = install_act_quant(model, recipe)
    assert len(handle.names) == len(quantized_linears(model, recipe))
    seen = []
    fc1 = arch.block_linears(model, 1)[4].module
    h = fc1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))  # runs after the act hook
    with torch.no_grad():
        out = model(token_windows).logits
    h.remove()
    assert torch.equal(fake_quantize(seen[0], "mxint4", block_size=8), seen[0])
    assert 1e-4 < _rel(out, ref) < 1.0
    handle2 = install_act_quant(model, recipe)  # re-installing replaces, never stacks
    assert all(len(r.module._forward_pre_hooks) == 1 for r in arch.linear_layers(model))
    handle.remove()  # a replaced handle removes nothing of its successor
    assert all(len(r.module._forward_pre_hooks) == 1 for r in arch.linear_layers(model))
    handle2.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(token_windows).logits, ref)
    assert install_act_quant(model, Recipe("mxint4")) is None


def test_quantize_model_with_act_format_keeps_hooks(token_windows):
    model = tiny_model("gpt2")
    quantize_model(model, Recipe("mxint8", act_format="mxint8"), token_windows, progress=False)
    with torch.no_grad():
        a = model(token_windows).logits
    assert remove_act_quant(model) == len(arch.linear_layers(model))
    assert all(not r.module._forward_pre_hooks for r in arch.linear_layers(model))
    with torch.no_grad():
        b = model(token_windows).logits
    assert not torch.equal(a, b)


def test_collect_hessians_matches_hand_computed(token_windows):
    model = tiny_model("llama")
    name = arch.block_linears(model, 1)[4].name  # mlp.gate_proj of block 1
    module = arch.block_linears(model, 1)[4].module
    xs = []
    h = module.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach().double()))
    with torch.no_grad():
        model(token_windows)
    h.remove()
    X = torch.cat(xs).reshape(-1, module.in_features)
    expected = 2.0 / X.shape[0] * X.T @ X
    H = collect_hessians(model, token_windows, names=[name], batch_size=4)
    assert set(H) == {name} and H[name].dtype == torch.float64
    torch.testing.assert_close(H[name], expected, rtol=1e-5, atol=1e-7)
    assert len(collect_hessians(model, token_windows[:2])) == len(arch.linear_layers(model))
    with pytest.raises(ValueError, match="unknown linear layer"):
        collect_hessians(model, token_windows, names=["nope"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_products_give_each_linears_own_sums_bit_for_bit(family, token_windows, monkeypatch):
    """capture_linear_inputs computes one float32 x^T x per input tensor and width (q/k/v and gate/up read one) into
    a reused buffer; every layer's sums are still bit for bit one fresh product per linear and batch, added as
    float64, and the number of products is the number of distinct inputs, not of linears."""
    model = tiny_model(family)
    refs = arch.linear_layers(model)
    expected = {r.name: torch.zeros(r.in_features, r.in_features, dtype=torch.float64) for r in refs}

    def fresh(ref, x):
        x = x.detach().reshape(-1, ref.in_features).float()
        expected[ref.name] += (x.T @ x).double()

    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    with torch.no_grad(), arch.input_hooks(refs, fresh), capture_linear_inputs(refs) as stats:
        for lo in range(0, token_windows.shape[0], 4):
            model(token_windows[lo: lo + 4])
    for r in refs:
        assert torch.equal(stats[r.name].xtx, expected[r.name]), r.name
    batches = -(-token_windows.shape[0] // 4)
    # per block: the attention input (q/k/v; gpt2's fused c_attn), o's, the MLP input (gate/up; c_fc), down's
    assert len(calls) == batches * 4 * len(arch.blocks(model))
    assert len(refs) == (7 if family == "llama" else 4) * len(arch.blocks(model))


def test_size_report_hand_computed():
    model = tiny_model("llama")  # hidden 32, intermediate 64, 2 layers
    size = size_report(model, Recipe("mxint4"))
    q = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    total = sum(p.numel() for p in model.parameters())
    assert size["quantized_params"] == q
    assert size["effective_bits_per_param"] == pytest.approx(4.25)  # 4 bits + an 8-bit scale per 32
    assert size["size_bytes"] == pytest.approx(q * 4.25 / 8 + (total - q) * 2)
    assert size["compression_ratio"] == pytest.approx(2 * total / size["size_bytes"])
    assert get_format("int4").bits_per_element(None, row_length=64) == pytest.approx(4.25)


def test_clear_errors(token_windows):
    class Mamba(nn.Module):
        class config:  # noqa: N801
            model_type = "mamba"

    with pytest.raises(UnsupportedArchitectureError, match="supported families: llama, opt, gpt2, gpt_neox"):
        quantize_model(Mamba(), Recipe("mxint4"), token_windows)
    model = tiny_model("llama")
    with pytest.raises(DataError, match="calibration data is empty"):
        quantize_model(model, Recipe("mxint4"), torch.empty(0, dtype=torch.long))
    with pytest.raises(DataError, match="calibration data is empty"):
        quantize_model(model, Recipe("mxint4", method="gptq"), torch.empty(0, 16, dtype=torch.long))


def test_one_dim_calibration_ids_are_cut_into_windows():
    model = tiny_model("gpt_neox")
    ids = torch.randint(3, VOCAB, (500,), generator=torch.Generator().manual_seed(0))
    recipe = Recipe("mxint4", method="gptq", calib_samples=5, calib_seq_len=20)  # RTN would skip calibration
    report = quantize_model(model, recipe, ids, progress=False)
    assert report.calibration_tokens == 100


def test_save_quantized_round_trip(tmp_path, tokenizer, token_windows):
    from quantpredict.models import load

    model = tiny_model("llama")
    recipe = Recipe("mxint4", method="gptq", act_format="mxint8")
    report = quantize_model(model, recipe, token_windows, progress=False)
    with torch.no_grad():
        expected = model(token_windows).logits
    out = save_quantized(model, recipe, report, tmp_path / "q", tokenizer=tokenizer)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["label"] == recipe.label and meta["report"]["quantized_params"] == report.quantized_params
    assert read_quantization(out).recipe == recipe and read_quantization(tmp_path) is None
    loaded, tok = load(out, attn_implementation="eager")  # as tiny_model: same kernels, same rounding
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_windows).logits, expected)  # weights and act hooks restored
    assert len(tok) == len(tokenizer)


def test_sample_calibration(tokenizer):
    w = sample_calibration(tokenizer, 3, 40, seed=1)
    assert w.shape == (3, 40) and w.dtype == torch.long
    assert torch.equal(w, sample_calibration(tokenizer, 3, 40, seed=1))
    assert not torch.equal(w, sample_calibration(tokenizer, 3, 40, seed=2))
    with pytest.raises(DataError):
        sample_calibration(tokenizer, 0, 40)


def test_cli_quantize(tiny_hf_dir, tmp_path, capsys):
    from quantpredict.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_hf_dir), "--format", "mxint4", "--method", "gptq", "--smoothquant", "0.5",
               "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mxint4-gptq-sq0.5-cal4x32" in text and "model.layers.1.mlp.down_proj" in text
    assert read_quantization(out).recipe.label == "mxint4-gptq-sq0.5-cal4x32"
    rc = main(["quantize", str(tiny_hf_dir), "--format", "mxint17", "--out", str(out)])
    assert rc == 2
    assert "unknown format 'mxint17'" in capsys.readouterr().err


def test_rtn_is_data_free_unless_output_errors_are_asked_for(any_family, token_windows):
    import math

    model = tiny_model(any_family)
    with_pass, data_free = tiny_model(any_family), tiny_model(any_family)
    rep_pass = quantize_model(with_pass, Recipe("mxint4", act_format="mxint8"), token_windows, progress=False,
                              output_errors=True)
    rep_free = quantize_model(data_free, Recipe("mxint4", act_format="mxint8"), token_windows, progress=False)
    # the same weights either way: RTN rounds each weight on its own
    for a, b, fp in zip(arch.linear_layers(with_pass), arch.linear_layers(data_free), arch.linear_layers(model)):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(b.weight, fake_quantize(fp.weight.detach(), "mxint4", axis=-1))
    assert rep_free.calibration_tokens == 0 and rep_pass.calibration_tokens == token_windows.numel()
    assert all(math.isnan(r.output_error) for r in rep_free.layers)
    assert all(r.output_error >= 0 for r in rep_pass.layers)
    assert [r.rel_weight_error for r in rep_free.layers] == pytest.approx([r.rel_weight_error for r in rep_pass.layers])
    with torch.no_grad():  # activation quantization is installed on the data-free path too
        assert torch.equal(with_pass(token_windows).logits, data_free(token_windows).logits)


def test_data_free_rtn_takes_no_calibration_data_and_says_its_output_errors_were_not_measured(token_windows):
    from quantpredict.quantize import needs_calibration

    model, reference = tiny_model("llama"), tiny_model("llama")
    report = quantize_model(model, Recipe("mxint4", act_format="mxint8"), None, progress=False)
    quantize_model(reference, Recipe("mxint4", act_format="mxint8"), token_windows, progress=False)
    for a, b in zip(arch.linear_layers(model), arch.linear_layers(reference)):
        assert torch.equal(a.weight, b.weight)
    assert not report.output_errors_measured and report.calibration_tokens == 0
    s, d = report.summary(), report.to_dict()
    assert s["output_errors_measured"] is False
    assert s["mean_output_error"] is None and s["mean_output_error_rtn"] is None
    assert all(r["output_error"] is None and r["output_error_rtn"] is None for r in d["layers"])
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN passed on
    table = report.format_table()
    assert "output errors not measured" in table and "nan" not in table.lower()
    assert needs_calibration(Recipe("mxint4")) is False and needs_calibration(Recipe("mxint4"), output_errors=True)
    calibrated = (Recipe("mxint4", method="gptq"), Recipe("mxint4", smoothquant_alpha=0.5), Recipe("mxint4", awq=True))
    for recipe in calibrated:
        assert needs_calibration(recipe)
        with pytest.raises(DataError, match="needs a calibration pass"):
            quantize_model(tiny_model("llama"), recipe, None, progress=False)
    with pytest.raises(DataError, match="needs a calibration pass"):
        quantize_model(tiny_model("llama"), Recipe("mxint4"), None, progress=False, output_errors=True)
    measured = quantize_model(tiny_model("llama"), Recipe("mxint4", method="gptq"), token_windows, progress=False)
    assert measured.output_errors_measured and measured.summary()["mean_output_error"] >= 0


@pytest.mark.parametrize("what", [["--format", "mxint4"], ["--mix", "q4_k_m"]])
def test_cli_rtn_runs_no_calibration_pass_unless_asked_and_saves_the_same_weights(tiny_hf_dir, tmp_path, capsys,
                                                                                   monkeypatch, what):
    from safetensors.torch import load_file

    import quantpredict.quantize as qz
    import quantpredict.quantize.model as qm
    from quantpredict.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("data-free RTN ran a calibration step")

    with monkeypatch.context() as m:
        m.setattr(qm, "_calibrated_blocks", refuse)
        m.setattr(qz, "sample_calibration", refuse)  # not even the calibration text is tokenized
        assert main(["quantize", str(tiny_hf_dir), *what, "--method", "rtn", "--out", str(tmp_path / "free"),
                     "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["output_errors_measured"] is False and rep["calibration_tokens"] == 0
    assert rep["mean_output_error"] is None and all(r["output_error"] is None for r in rep["layers"])
    assert main(["quantize", str(tiny_hf_dir), *what, "--method", "rtn", "--output-errors", "--calib-samples", "4",
                 "--calib-seq-len", "32", "--out", str(tmp_path / "pass")]) == 0
    text = capsys.readouterr().out
    assert "mean output error: RTN" in text and "not measured" not in text
    free, with_pass = (load_file(tmp_path / run / "model.safetensors") for run in ("free", "pass"))
    assert free.keys() == with_pass.keys()
    assert all(torch.equal(free[k], with_pass[k]) for k in free)  # bit-identical, with or without the pass
    assert read_quantization(tmp_path / "free").report["output_errors_measured"] is False


def test_layer_norm_is_float64_accurate():
    """The report's relative weight error sums squares per row in float32 and the rows in float64: within 1e-9 of a
    float64 copy's norm on a layer-sized tensor (a float32 norm of the whole tensor is off by ~1e-4 here); a single
    row's float32 sum of 1536 squares bounds the error, ~n * 2^-24 at worst (1e-4), 1e-7 typically."""
    from quantpredict.quantize.rtn import frobenius_norm as _norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1536, generator=g) + 3.0
    assert _norm(x) == pytest.approx(float(x.double().norm()), rel=1e-9)
    assert _norm(x[0]) == pytest.approx(float(x[0].double().norm()), rel=1e-6)
    assert _norm(x.bfloat16()) == pytest.approx(float(x.bfloat16().double().norm()), rel=1e-6)


def test_relative_error_kernel_matches_float64():
    """The C kernel's ``relative_error`` (float32 CPU tensors: squares and sums in float64, the difference in float32
    as the torch path takes it) equals the float64 computation of the same float32 difference to float64's summation
    error (n 2^-53 relative, ~1e-10 here), with one and with two threads, and a NaN weight gives a non-finite sum."""
    from quantpredict.formats import native
    from quantpredict.quantize.rtn import relative_error, rtn_quantize

    if not native.available():
        pytest.skip("no C compiler: relative_error takes the torch path, tested above")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 777, generator=g) * 0.02  # 777 000 elements: not a multiple of 8 or of a chunk
    q = rtn_quantize(w, "int4")
    want = float((q - w).double().norm() / w.double().norm())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert relative_error(w, q) == pytest.approx(want, rel=1e-10)
    finally:
        torch.set_num_threads(threads)
    a, b = native.squared_sums(w)
    assert a == pytest.approx(float(w.double().pow(2).sum()), rel=1e-10) and b == 0.0
    bad = w.clone()
    bad[3, 5] = float("nan")
    assert not math.isfinite(native.squared_sums(bad)[0])
    assert native.squared_sums(w.double()) is None  # another dtype: the caller's torch path
