"""Data-free RTN from a checkpoint's files (quantpredict.checkpoint_rtn) gives the model path's result bit for bit,
is taken only where the files determine that result, and imports no transformers.

The reference is the model path in the same process: ``models.load(dtype="auto")`` + ``quantize_model`` (no
calibration) + ``save_quantized``, on tiny random-weight checkpoints of every model type the direct path takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from test_arch_families import CONFIGS, VOCAB, build

from quantpredict import checkpoint_rtn
from quantpredict.cli import main
from quantpredict.models import load
from quantpredict.quantize import Recipe, quantize_model, save_quantized
from quantpredict.quantize.report import QUANT_CONFIG

DIRECT_CASES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def _save(model, path: Path, tokenizer, dtype=None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _model_path(src: Path, recipe: Recipe | str, out: Path) -> Path:
    """The model path: built model, quantize_model without calibration, save_quantized."""
    from quantpredict.mixes import named_mix

    model, tok = load(src, dtype="auto")
    r = named_mix(recipe, model) if isinstance(recipe, str) else recipe
    report = quantize_model(model, r, None, progress=False)
    return save_quantized(model, r, report, out, tokenizer=tok)


def _direct_path(src: Path, recipe: Recipe | str, out: Path) -> Path:
    plan = checkpoint_rtn.direct_plan(src)
    assert not isinstance(plan, str), plan
    mix = recipe if isinstance(recipe, str) else None
    base = Recipe(weight_format="q4_k", method="rtn") if mix else recipe
    r = checkpoint_rtn.resolve_recipe(plan, base, mix)
    checkpoint_rtn.quantize_checkpoint(plan, r, out, progress=False)
    return out


def _assert_same_result(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k  # bit for bit
    ja, jb = (json.loads((d / QUANT_CONFIG).read_text()) for d in (a, b))
    ja["report"].pop("total_seconds")
    jb["report"].pop("total_seconds")
    assert ja == jb


@pytest.mark.parametrize("case", DIRECT_CASES)
def test_every_direct_type_has_a_case_and_matches_the_model_path(case, tmp_path, tokenizer):
    assert set(checkpoint_rtn.DIRECT_TYPES) == set(DIRECT_CASES)
    src = _save(build(case), tmp_path / "src", tokenizer)
    recipe = Recipe(weight_format="int4", block_size=16, method="rtn", skip=("mlp.down_proj",),
                    act_format="mxint8")
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), _direct_path(src, recipe, tmp_path / "direct"))


@pytest.mark.parametrize("recipe", ["q4_k_m", "q3_k_m", Recipe(weight_format="q4_0", method="rtn"),
                                    Recipe(weight_format="mxfp4_e2m1", method="rtn")], ids=str)
def test_named_mixes_and_llama_types_match_the_model_path(recipe, tmp_path, tokenizer):
    """A mix resolves from the checkpoint's names and shapes as named_mix does from the built model (a GQA
    model, so the n_gqa rules are read from config.json too)."""
    src = _save(build("qwen2"), tmp_path / "src", tokenizer)
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), _direct_path(src, recipe, tmp_path / "direct"))


@pytest.mark.parametrize("fmt", ["mxint4", "q4_0"])  # through torch, and through the C kernel without it
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_checkpoint_stays_16_bit_and_matches(dtype, fmt, tmp_path, tokenizer):
    src = _save(build("llama"), tmp_path / "src", tokenizer, dtype=dtype)
    recipe = Recipe(weight_format=fmt, method="rtn")
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), _direct_path(src, recipe, tmp_path / "direct"))
    assert load_file(tmp_path / "direct" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == dtype


@pytest.mark.parametrize("fmt", ["q4_0", "mxint4"])
def test_a_sharded_checkpoint_is_read_shard_by_shard_and_written_whole(fmt, tmp_path, tokenizer):
    """Checkpoints of larger models come in shards with an index: every shard is mapped, the tensors are written
    into one ``model.safetensors`` (no index is carried), and the result is the model path's bit for bit."""
    src = tmp_path / "src"
    build("llama").save_pretrained(src, max_shard_size="20KB")
    tokenizer.save_pretrained(src)
    assert len(list(src.glob("model-*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    recipe = Recipe(weight_format=fmt, method="rtn")
    direct = _direct_path(src, recipe, tmp_path / "direct")
    assert not (direct / "model.safetensors.index.json").exists()
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), direct)


def test_an_untied_head_is_copied_and_left_unquantized(tmp_path, tokenizer):
    cls, fields = CONFIGS["qwen2"]
    cfg = cls(**fields, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    src = _save(model, tmp_path / "src", tokenizer)
    assert "lm_head.weight" in load_file(src / "model.safetensors")
    recipe = Recipe(weight_format="q8_0", method="rtn")
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), _direct_path(src, recipe, tmp_path / "direct"))


@pytest.mark.parametrize("recipe", ["q3_k_s", "q4_k_m", "q5_k_m", "q6_k_pure",
                                    *(Recipe(weight_format=f, method="rtn") for f in ("q3_k", "q4_k", "q5_k"))],
                         ids=str)
def test_k_types_through_the_whole_kernels_are_the_model_paths_bit_for_bit(recipe, tmp_path, tokenizer,
                                                                          monkeypatch):
    """The K types on rows of 256 go through the C kernels that quantize them whole (no torch on the direct path);
    the model path rounds them with the torch path (its sub-block searches in C), and the two results are equal bit
    for bit: uniform types and the named mixes built on them."""
    from quantpredict.formats import native

    if not native.available():
        pytest.skip("no C compiler: every type takes rtn_quantize")
    cls, fields = CONFIGS["qwen2"]
    cfg = cls(**{**fields, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                 "num_key_value_heads": 2}, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    src = _save(tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tmp_path / "src", tokenizer)
    calls = []
    fused = native.whole_sums_at
    monkeypatch.setattr(native, "whole_sums_at", lambda *a, **k: calls.append(a[3]) or fused(*a, **k))
    direct = _direct_path(src, recipe, tmp_path / "direct")
    assert {"q3_k", "q4_k", "q5_k", "q6_k"} & set(calls)
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), direct)


def _edit_checkpoint(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _edit_config(src: Path, **fields) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(fields)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, reason", [
    (lambda src: _edit_config(src, model_type="gpt2"), "model type 'gpt2'"),
    (lambda src: _edit_config(src, tie_word_embeddings=True), "stored although tied"),
    (lambda src: _edit_checkpoint(src, lambda t: t.pop("lm_head.weight")), "untied head is not stored"),
    (lambda src: _edit_checkpoint(src, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(4)})),
     "not one the model keeps"),
    (lambda src: _edit_checkpoint(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()})),
     "stored as F16"),
    (lambda src: _edit_checkpoint(src, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
     "no 2-D model.layers.1.mlp.down_proj.weight"),
    (lambda src: _edit_config(src, num_hidden_layers=1), "more blocks than the config"),
    (lambda src: (src / QUANT_CONFIG).write_text("{}"), "itself a quantized model"),
], ids=["type", "tied-head-stored", "untied-head-missing", "buffer", "dtype", "missing-linear", "extra-block",
        "quantized"])
def test_checkpoints_the_files_do_not_determine_go_through_the_model(change, reason, tmp_path, tokenizer):
    src = _save(build("llama"), tmp_path / "src", tokenizer)
    change(src)
    plan = checkpoint_rtn.direct_plan(src)
    assert isinstance(plan, str) and reason in plan


@pytest.mark.parametrize("recipe, kwargs, reason", [
    (Recipe(weight_format="int4", method="gptq"), {}, "calibrates"),
    (Recipe(weight_format="int4", method="rtn", awq=True), {}, "AWQ"),
    (Recipe(weight_format="int4", method="rtn", smoothquant_alpha=0.5), {}, "SmoothQuant"),
    (Recipe(weight_format="int4", method="rtn"), {"output_errors": True}, "output errors"),
    (Recipe(weight_format="q4_0", method="rtn"), {"imatrix": "x.gguf"}, "imatrix"),
    (Recipe(weight_format="q4_k", method="rtn"), {"mix": "q4_k_m-file"}, "embedding and head"),
])
def test_recipes_that_calibrate_or_touch_the_head_go_through_the_model(recipe, kwargs, reason):
    assert reason in checkpoint_rtn.recipe_problem(recipe, **kwargs)
    assert checkpoint_rtn.recipe_problem(Recipe(weight_format="int4", method="rtn")) is None


def test_the_command_takes_the_direct_path_without_transformers(tmp_path, tokenizer):
    """``quantpredict quantize --method rtn`` on a llama checkpoint imports no transformers, and what it writes
    loads and evaluates as the model path's output does."""
    src = _save(build("llama"), tmp_path / "src", tokenizer)
    out = tmp_path / "out"
    code = ("import sys; from quantpredict.cli import main; "
            f"rc = main(['quantize', {str(src)!r}, '--mix', 'q4_k_m', '--method', 'rtn', '--threads', '1', "
            f"'--out', {str(out)!r}]); "
            "print('transformers' in sys.modules, rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False 0"
    ref = _model_path(src, "q4_k_m", tmp_path / "model")
    _assert_same_result(ref, out)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    a, _ = load(ref)
    b, _ = load(out)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_failed_direct_quantization_leaves_no_folder(tmp_path, tokenizer, capsys, monkeypatch):
    """q2_k needs rows of a multiple of 256: the error names the fix (exit 2), before any tensor is read (no staged
    folder is begun), and no output folder appears."""
    import quantpredict.files

    src = _save(build("llama"), tmp_path / "src", tokenizer)
    monkeypatch.setattr(quantpredict.files, "staged_dir", lambda *a, **k: pytest.fail("work began"))
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--format", "q2_k", "--method", "rtn", "--out", str(out)]) == 2
    assert "multiple of 256" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_one_pass_types_round_and_measure_in_one_kernel_pass(fmt, tmp_path, tokenizer, monkeypatch):
    """The one-pass llama.cpp types take the C kernel that rounds and sums in one pass, into one reused buffer, and
    the result (weights and report, relative errors included) is still the model path's bit for bit."""
    from quantpredict.formats import native

    if not native.available():
        pytest.skip("no C compiler: every type takes rtn_quantize")
    calls = []
    fused = native.whole_sums_at
    monkeypatch.setattr(native, "whole_sums_at", lambda *a, **k: calls.append(a[3]) or fused(*a, **k))
    src = _save(build("qwen2"), tmp_path / "src", tokenizer)
    recipe = Recipe(weight_format=fmt, method="rtn")
    direct = _direct_path(src, recipe, tmp_path / "direct")
    assert calls and set(calls) == {fmt}
    _assert_same_result(_model_path(src, recipe, tmp_path / "model"), direct)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"])
@pytest.mark.parametrize("fmt", ["q4_0", "mxint4"])
def test_a_nan_weight_is_the_model_error_that_names_it_and_leaves_no_folder(key, fmt, tmp_path, tokenizer, capsys):
    """Checked as each tensor streams by (a linear weight of a one-pass type inside the kernel's pass): the same
    error as the model path's check before any work, and the staged folder goes."""
    src = _save(build("llama"), tmp_path / "src", tokenizer)
    _edit_checkpoint(src, lambda t: t[key].view(-1).__setitem__(5, float("nan")))
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--format", fmt, "--method", "rtn", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and "NaN/Inf" in err
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))


def test_the_one_pass_types_quantize_without_importing_torch(tmp_path, tokenizer):
    """``quantpredict quantize --method rtn`` of a one-pass type from a llama-layout checkpoint runs without torch
    (importing it is about 1 s, most of a 135M model's whole quantization), and writes what the model path writes;
    another format on the same path imports it for its rounding."""
    from quantpredict.formats import native

    if not native.available():
        pytest.skip("no C compiler: every type takes rtn_quantize")
    src = _save(build("llama"), tmp_path / "src", tokenizer)
    code = ("import sys; from quantpredict.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules); sys.exit(rc)")
    for fmt, torch_wanted in (("q4_0", False), ("mxint4", True)):
        out = tmp_path / f"cli-{fmt}"
        run = subprocess.run([sys.executable, "-c", code, "quantize", str(src), "--format", fmt, "--method", "rtn",
                              "--threads", "1", "--out", str(out)], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == f"{torch_wanted} False", run.stdout
    _assert_same_result(_model_path(src, Recipe(weight_format="q4_0", method="rtn"), tmp_path / "model"),
                        tmp_path / "cli-q4_0")
