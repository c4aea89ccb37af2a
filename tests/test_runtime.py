"""What a runtime does to activations (quantpredict.runtime): llama.cpp's CPU table against its C source, the
run-time hooks on a zoo model, and recipes priced as llama.cpp runs them (the activation term on top of the weights')
while ``runtime=None`` prices exactly as before."""

from __future__ import annotations

import re

import pytest
import torch

from quantpredict.errors import RecipeError
from quantpredict.export import source_dir
from quantpredict.formats import fake_quantize
from quantpredict.formats.table import GGML_TYPE_ID
from quantpredict.recipe import Recipe
from quantpredict.runtime import LLAMA_CPP_CPU, VEC_DOT_TYPE, activation_formats, install_runtime_act

MODEL = "llama-s"  # rows of 96 and 256: q8_0-family fallbacks and k-quants (on ffn_down) in one mix


def _ggml_name(fmt: str) -> str:
    return {"fp16": "F16", "bf16": "BF16"}.get(fmt, fmt.upper())


def _type_traits_cpu(text: str) -> dict[str, dict[str, str]]:
    """``{GGML type: {field: value}}`` of the ``type_traits_cpu`` initializer of ggml-cpu.c."""
    body = text[text.index("type_traits_cpu[GGML_TYPE_COUNT] = {"):]
    body = body[: body.index("\n};")]
    out = {}
    for name, fields in re.findall(r"\[GGML_TYPE_(\w+)\]\s*=\s*\{(.*?)\n    \}", body, flags=re.S):
        out[name] = dict(re.findall(r"\.(\w+)\s*=\s*(?:\([^)]*\)\s*)?([\w]+)", fields))
    return out


_CPU_C = source_dir() / "ggml" / "src" / "ggml-cpu" / "ggml-cpu.c"


@pytest.mark.skipif(not _CPU_C.is_file(), reason=f"llama.cpp's source is not unpacked at {_CPU_C}")
def test_table_is_type_traits_cpu():
    traits = _type_traits_cpu(_CPU_C.read_text())
    # every llama.cpp weight type the project writes, and the 16-bit ones, with ggml's vec_dot_type
    assert set(GGML_TYPE_ID) | {"fp16", "bf16"} == set(VEC_DOT_TYPE) == set(LLAMA_CPP_CPU)
    for fmt, vec_dot in VEC_DOT_TYPE.items():
        assert traits[_ggml_name(fmt)]["vec_dot_type"] == f"GGML_TYPE_{vec_dot}", fmt
    # the from_float each activation format reproduces
    assert traits["Q8_0"]["from_float"] == "quantize_row_q8_0" and traits["Q8_1"]["from_float"] == "quantize_row_q8_1"
    assert traits["Q8_K"]["from_float"] == "quantize_row_q8_K"
    assert traits["F16"]["from_float"] == "ggml_cpu_fp32_to_fp16" and traits["BF16"]["from_float"] == \
        "ggml_cpu_fp32_to_bf16"
    # on x86 quantize_row_q8_K is the reference function (what q8_k reproduces)
    x86 = (_CPU_C.parent / "arch" / "x86" / "quants.c").read_text()
    q8k = x86[x86.index("void quantize_row_q8_K("):]
    assert q8k[: q8k.index("}")].count("quantize_row_q8_K_ref(x, y, k);") == 1
    assert {LLAMA_CPP_CPU[f] for f in ("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_1", "q5_1")} == {("q8_0_x86", 32)}
    assert {LLAMA_CPP_CPU[f] for f in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")} == {("q8_k", 256)}


@pytest.fixture(scope="module")
def mp():
    from quantpredict.models import zoo_root
    from quantpredict.predict.rank import profile_model

    if not (zoo_root() / MODEL / "model.safetensors").exists():
        pytest.skip(f"zoo model {MODEL} absent")
    return profile_model(MODEL)


def _recipe(mp, spec: str) -> Recipe:
    from quantpredict.mixes import resolve_recipe

    return resolve_recipe(spec, mp.model)


def test_activation_formats_and_errors(mp):
    from quantpredict.quantize import layer_plan

    mix = _recipe(mp, "q4_k_m")
    plan = layer_plan(mp.model, mix)
    got = activation_formats(mp.model, mix)
    assert got == [LLAMA_CPP_CPU[p.weight_format] for p in plan]
    assert {("q8_0_x86", 32), ("q8_k", 256)} <= set(got)  # both families in one mix
    with pytest.raises(RecipeError, match="unknown runtime 'vllm'"):
        activation_formats(mp.model, mix, runtime="vllm")
    with pytest.raises(RecipeError, match="runs no 'mxint4' weights"):
        activation_formats(mp.model, Recipe("mxint4"))
    with pytest.raises(RecipeError, match="drop act_format"):
        activation_formats(mp.model, Recipe("q8_0", act_format="mxint8"))


def test_install_runtime_act_hooks_and_removes(mp):
    from quantpredict.quantize.act import has_act_quant

    model, mix = mp.model, _recipe(mp, "q4_k_m")
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    seen: dict[str, list] = {}

    def spy(name):
        def pre(_m, args):  # registered before the runtime's hook: the raw input
            seen.setdefault(name, [None, None])[0] = args[0].detach().clone()

        def post(_m, args, _out):  # after every pre-hook: the input the layer computed with
            seen[name][1] = args[0].detach().clone()
        return pre, post

    from quantpredict.quantize import layer_plan

    plan = layer_plan(model, mix)
    spies = []
    for p in plan:
        pre, post = spy(p.ref.name)
        spies += [p.ref.module.register_forward_pre_hook(pre), p.ref.module.register_forward_hook(post)]
    handle = install_runtime_act(model, mix)
    try:
        assert handle.formats == {p.ref.name: LLAMA_CPP_CPU[p.weight_format] for p in plan}
        assert all(has_act_quant(p.ref.module) for p in plan)
        with torch.no_grad():
            hooked = model(input_ids=ids).logits
        for p in plan:
            raw, used = seen[p.ref.name]
            fmt, block = LLAMA_CPP_CPU[p.weight_format]
            assert torch.equal(used, fake_quantize(raw, fmt, axis=-1, block_size=block)), p.ref.name
        assert not torch.equal(hooked, before)
    finally:
        handle.remove()
        for h in spies:
            h.remove()
    assert not any(has_act_quant(p.ref.module) for p in plan) and handle.formats == {}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # bit for bit


def test_runtime_price_adds_the_activation_term(mp, float32_prices):
    from quantpredict.features.act_price import act_quadratic
    from quantpredict.predict.rank import fp_reference_of, price, recipe_row
    from quantpredict.predict.shipped import PROFILE_PREDICTOR_DIR, resolve_predictor
    from quantpredict.quantize.rtn import rtn_quantize

    r = Recipe("q8_0")
    plain, run = recipe_row(mp, r), recipe_row(mp, r, runtime="llama.cpp-cpu")
    assert run["token_gn_quad"] > plain["token_gn_quad"] and run["act_input_quad"] > 0
    assert run["act_weight_quad"] == plain["token_gn_quad"]  # the weight part is the weight-only price, exactly
    assert (run["runtime_act"], run["runtime"], plain["runtime_act"], plain["runtime"]) == (
        "q8_0_x86", "llama.cpp-cpu", None, None)
    assert run["act_format"] is None and plain["act_format"] is None  # the recipe's own, not the runtime's
    # the activation part, layer by layer, is act_quadratic of the layer's runtime format; one layer in float64
    parts = []
    for ref in mp.refs:
        w_q = rtn_quantize(ref.weight.detach().float(), "q8_0")
        parts.append(act_quadratic(w_q, w_q - ref.weight.detach().float(), mp.profile.token_inputs[ref.name],
                                   mp.profile.token_grads[ref.name], None, "q8_0_x86", 32)[2])
    total = 0.0
    for a in parts:
        total += a
    assert run["act_input_quad"] == total
    ref = mp.refs[0]
    x = mp.profile.token_inputs[ref.name].float()
    s = mp.profile.token_grads[ref.name].double()
    w_q = rtn_quantize(ref.weight.detach().float(), "q8_0").double()
    err = (fake_quantize(x, "q8_0_x86", axis=-1) - x).double()  # [T, in]
    want = 0.5 * float(((s * (err @ w_q.T)).sum(1) ** 2).mean())
    assert parts[0] == pytest.approx(want, rel=1e-5) and want > 0
    # through the one pricing path: the runtime is in the row and in attrs; a larger predicted KLD
    pred = resolve_predictor(PROFILE_PREDICTOR_DIR)
    fp = fp_reference_of(mp)
    a, b = price(mp, [r], pred, fp), price(mp, [r], pred, fp, runtime="llama.cpp-cpu")
    assert a.attrs["runtime"] is None and b.attrs["runtime"] == "llama.cpp-cpu"
    assert b.loc[0, "runtime"] == "llama.cpp-cpu" and b.loc[0, "kld"] > a.loc[0, "kld"]


def test_runtime_none_prices_as_before(mp):
    # runtime=None takes today's paths: the weight-only price for a plain recipe, the single act_format for a
    # weight+activation one (price_act_recipe without act_formats); equal floats, not approximately
    from quantpredict.features.act_price import price_act_recipe
    from quantpredict.features.fisher import price_deltas, profile_deltas
    from quantpredict.predict.rank import recipe_row
    from quantpredict.quantize import layer_plan

    for spec in ("q4_k_m", "q8_0-rtn-a_mxint8"):
        r = _recipe(mp, spec)
        row = recipe_row(mp, r)
        planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(mp.model, r)}
        formats = [planned.get(x.name) for x in mp.refs]
        if r.act_format is None:
            want = price_deltas(mp.profile, [x.name for x in mp.refs],
                                profile_deltas(mp.refs, formats, "rtn", mp.profile), kfac=False)
        else:
            want = price_act_recipe(mp.model, mp.profile, mp.refs, formats, "rtn", act_format=r.act_format,
                                    act_block=r.act_block, smoothquant_alpha=None)
            # the per-layer form with the same format everywhere is the same price, bit for bit
            same = price_act_recipe(mp.model, mp.profile, mp.refs, formats, "rtn", act_format=None, act_block=None,
                                    smoothquant_alpha=None, act_formats=[(r.act_format, r.act_block)] * len(formats))
            assert all(same[k] == v for k, v in want.items() if v == v)
        assert all(row[k] == v for k, v in want.items() if v == v) and row["runtime"] is None
        assert row["act_format"] == r.act_format


def test_cli_predict_and_rank_label_the_runtime(mp, capsys):
    import json

    from quantpredict.cli import main

    assert main(["predict", MODEL, "--format", "q8_0", "--runtime", "llama.cpp-cpu"]) == 0
    out = capsys.readouterr().out
    assert "as llama.cpp-cpu runs it (activation rounding included)" in out and "q8_0-rtn" in out
    assert main(["predict", MODEL, "--format", "q8_0", "--runtime", "llama.cpp-cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "llama.cpp-cpu"
    assert main(["rank", MODEL, "--recipes", "q8_0-rtn,q4_k_m", "--runtime", "llama.cpp-cpu", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["runtime"] == "llama.cpp-cpu" and len(ranked["candidates"]) == 2
    assert main(["rank", MODEL, "--recipes", "q8_0-rtn", "--runtime", "llama.cpp-cpu"]) == 0
    assert "as llama.cpp-cpu runs it" in capsys.readouterr().out
    # refused before any work: a format llama.cpp does not run, a measurement, an unknown runtime
    assert main(["rank", MODEL, "--recipes", "mxint4-rtn", "--runtime", "llama.cpp-cpu"]) != 0
    assert "runs no 'mxint4' weights" in capsys.readouterr().err
    assert main(["predict", MODEL, "--format", "q8_0", "--runtime", "llama.cpp-cpu", "--measure"]) != 0
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rank", MODEL, "--runtime", "vllm"])


def test_a_quantized_head_has_its_input_rounded_too():
    """With ``head_format`` the head is a quantized matmul in llama.cpp (its input rounded to the weight type's
    vec_dot_type); without it, no hook (the head stays F16)."""
    from conftest import tiny_model

    from quantpredict import arch
    from quantpredict.quantize.act import has_act_quant

    model = tiny_model("llama")  # untied, rows of 32
    head = arch.head(model)
    seen = {}
    spy = head.register_forward_hook(lambda _m, args, _out: seen.__setitem__("x", args[0].detach().clone()))
    raw_spy = head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("raw", args[0].detach().clone()))
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    handle = install_runtime_act(model, Recipe("q8_0", head_format="q8_0"))
    try:
        assert handle.formats["lm_head"] == LLAMA_CPP_CPU["q8_0"] and has_act_quant(head)
        with torch.no_grad():
            model(input_ids=ids)
        fmt, block = LLAMA_CPP_CPU["q8_0"]
        assert torch.equal(seen["x"], fake_quantize(seen["raw"], fmt, axis=-1, block_size=block))
    finally:
        handle.remove()
        spy.remove()
        raw_spy.remove()
    plain = install_runtime_act(model, Recipe("q8_0"))
    assert "lm_head" not in plain.formats and not has_act_quant(head)
    plain.remove()


def test_the_comparison_sees_a_quantized_heads_rounding():
    """The comparison applies a chunkable head in token chunks from the last hidden state; with a runtime hook on
    the head it must run the head's forward instead, or the rounding would be skipped. Checked against a float64
    recomputation of the hooked model's own logits."""
    import copy

    from conftest import tiny_model

    from quantpredict import evaluate, lmhead, quantize

    fp = tiny_model("llama")
    q = copy.deepcopy(fp)
    recipe = Recipe("q4_0", head_format="q4_0")
    quantize.quantize_model(q, recipe, None, progress=False)
    assert lmhead.supports_chunking(q)
    handle = install_runtime_act(q, recipe)
    try:
        assert not lmhead.supports_chunking(q)
        ids = torch.randint(3, 100, (64,), generator=torch.Generator().manual_seed(1))
        c = evaluate.compare_ids(fp, q, ids, seq_len=32, batch_size=2, progress=False)
        with torch.no_grad():
            lp = torch.log_softmax(fp(input_ids=ids.view(2, 32)).logits[:, :-1].double(), -1)
            lq = torch.log_softmax(q(input_ids=ids.view(2, 32)).logits[:, :-1].double(), -1)
        assert c.kld > 0 and c.kld == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-5)
    finally:
        handle.remove()
    assert lmhead.supports_chunking(q)
