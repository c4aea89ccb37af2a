"""``quantpredict export``: a zoo model under RTN recipes of llama.cpp types as a GGUF file (quantpredict.export).

llama-s (Llama, rows of 96 and 256: Q8_0/Q4_0/Q5_x/IQ4_NL everywhere, the k-quants on ffn_down) is converted by the
pinned llama.cpp converter; each quantized tensor of the written file, dequantized by gguf, must equal the project's
fake-quantized weight bit for bit (q/k rows moved as the converter moves them). The tests that need the converter
skip without the sdist; the llama.cpp tool tests skip without the built tools (benchmarks/llamacpp_reference.py
build).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantpredict import export
from quantpredict.cli import main
from quantpredict.errors import FormatError, ModelError, RecipeError

MODEL = "llama-s"
CONVERTER_MISSING = (f"llama.cpp's converter ({export.SDIST} in {export.llama_cpp_home()}) and the packages it "
                     f"imports ({', '.join(export.CONVERTER_PACKAGES)}: make setup-export) are not all here")
needs_converter = pytest.mark.skipif(not export.converter_available(), reason=CONVERTER_MISSING)


def _tool(name: str) -> Path | None:
    p = export.llama_cpp_home() / f"build-{export.LLAMA_CPP_PYTHON}" / "bin" / name
    return p if p.is_file() else None


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


# ---- the plan: from the config alone --------------------------------------------------------------------------------


def test_plan_of_a_named_mix_has_llama_cpp_fallbacks_and_file_type():
    plan = export.plan_export(MODEL, "q4_k_m")
    assert plan.mix == "q4_k_m" and plan.file_type == "MOSTLY_Q4_K_M" and plan.llama_quantize_type == "Q4_K_M"
    kinds = {layer.name.removeprefix("model.layers."): layer.kind for layer in plan.layers}
    assert kinds["0.self_attn.q_proj"] == "q5_0"  # rows of 96: Q4_K's fallback
    assert kinds["0.mlp.down_proj"] == "q4_k" and kinds["2.mlp.down_proj"] == "q6_k"  # use_more_bits(2, 3)
    assert kinds["2.self_attn.v_proj"] == "q8_0"  # Q6_K's fallback
    assert export.plan_export(MODEL, "q8_0-rtn").file_type == "MOSTLY_Q8_0"
    # an explicit per-layer label that is a mix's resolution is recognised as that mix
    assert export.plan_export(MODEL, plan.recipe_label).mix == "q4_k_m"


def test_plan_takes_the_recipes_embedding_and_head_types():
    """A recipe's E= / H= (what it measured) are the file's token_embd / output types; an option that says
    otherwise is refused, one that agrees is fine. MODEL ties its head to the embedding: one matrix, token_embd,
    in the head's type as llama.cpp stores it, and two different types for it are refused."""
    assert export.plan_export(MODEL, "q8_0-rtn-H=q4_0").role_type("token_embd.weight") == "q4_0"
    with pytest.raises(RecipeError, match="ties"):
        export.plan_export(MODEL, "q8_0-rtn-E=q8_0-H=q4_0")
    assert export.plan_export(MODEL, "q8_0-rtn-E=q8_0", embedding_type="Q8_0").role_type("token_embd.weight") == "q8_0"
    with pytest.raises(RecipeError, match="contradicts"):
        export.plan_export(MODEL, "q8_0-rtn-E=q8_0", embedding_type="q4_0")


def test_plan_of_a_per_layer_recipe_takes_the_most_common_type():
    from quantpredict.recipe import Recipe

    n = len(export.plan_export(MODEL, "q8_0-rtn").layers)
    recipe = Recipe("q4_0", layer_formats=[("q4_0", None)] * (n - 2) + [("q8_0", None), ("skip", None)])
    plan = export.plan_export(MODEL, recipe.label, keep="bf16")
    assert plan.file_type == "MOSTLY_Q4_0" and plan.mix is None
    assert [(x.kind, x.quantized) for x in plan.layers[-2:]] == [("q8_0", True), ("bf16", False)]


@pytest.mark.parametrize("recipe,words", [
    ("q4_k_m-gptq", "RTN"), ("q8_0-rtn-awq", "AWQ"), ("q8_0-rtn-sq0.5", "SmoothQuant"), ("q8_0-qat", "QAT"),
    ("q8_0-rtn-a_int8", "activation"), ("mxint4-rtn", "not a llama.cpp type"), ("q4_k-rtn", "q5_0"),
])
def test_plan_refuses_what_a_gguf_file_cannot_hold(recipe, words):
    with pytest.raises((RecipeError, FormatError), match=words):
        export.plan_export(MODEL, recipe)


def test_rows_that_no_block_tiles_are_named_by_layer():
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.mlp\.down_proj.*176"):
        export.plan_export("llama-xs", "q8_0-rtn")  # intermediate size 176: not a multiple of 32


def test_tensor_type_patterns_name_exactly_their_tensors():
    import re

    types = {f"blk.{i}.attn_q.weight": "q5_0" for i in range(12)}
    types |= {f"blk.{i}.ffn_down.weight": ("q6_k" if i in (1, 10) else "q4_k") for i in range(12)}
    types["token_embd.weight"] = "f16"
    patterns = export.tensor_type_patterns(types)
    assert r"^blk\.[0-9]+\.attn_q\.weight$=q5_0" in patterns
    assert r"^blk\.(1|10)\.ffn_down\.weight$=q6_k" in patterns
    names = [*types, "blk.100.ffn_down.weight", "blk.1.ffn_down.weight.x"]
    for name in names:  # llama-quantize takes the first pattern that matches (std::regex_search)
        hits = [p.rsplit("=", 1)[1] for p in patterns if re.search(p.rsplit("=", 1)[0], name)]
        assert hits[:1] == ([types[name]] if name in types else []), (name, hits)


# ---- the file -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    """llama-s converted to F32 once by the real converter; :func:`export.convert` then copies it (the tests
    check the rewrite; test_cli_export_q4_k_m runs the converter itself)."""
    if not export.converter_available():
        pytest.skip(CONVERTER_MISSING)
    from quantpredict.models import resolve

    path = tmp_path_factory.mktemp("f32") / "llama-s-f32.gguf"
    conv = export.convert(resolve(MODEL), path)
    assert conv.pre_tokenizer_fallback  # the zoo's tokenizer is unknown to the converter by its hash
    return path


@pytest.fixture
def cached_convert(f32_file, monkeypatch):
    def fake(model_dir, out, outtype="f32", *, src=None):
        shutil.copyfile(f32_file, out)
        return export.Conversion(Path(out), True, "")

    monkeypatch.setattr(export, "convert", fake)
    return f32_file


def _hf_weights() -> dict:
    from safetensors.torch import load_file

    from quantpredict.models import resolve

    return {k: v.float() for k, v in load_file(str(resolve(MODEL) / "model.safetensors")).items()}


def _permute(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: q/k rows into llama.cpp's rope layout (whole rows move)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_file(path: Path, f32: Path, plan: export.ExportPlan) -> dict[str, str]:
    """Every tensor of the F32 file in order, each linear in its planned type and equal bit for bit to the
    project's RTN of the checkpoint's weight; the kept tensors and every field as they should be."""
    import gguf
    import torch

    from quantpredict.quantize.rtn import rtn_quantize

    out, src = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(f32))
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    names = export.gguf_names(plan, "llama", 3)
    weights = _hf_weights()
    cfg = json.loads((plan.model_dir / "config.json").read_text())
    by_name = {t.name: t for t in out.tensors}
    types = {t.name: t.tensor_type.name.lower() for t in out.tensors}
    for layer in plan.layers:
        t = by_name[names[layer.name]]
        assert types[t.name] == layer.kind, t.name
        w = weights[layer.name + ".weight"]
        if layer.name.endswith(("q_proj", "k_proj")):
            heads = cfg["num_attention_heads"] if layer.name.endswith("q_proj") else cfg["num_key_value_heads"]
            w = _permute(w, heads)
        want = (rtn_quantize(w, {"f16": "fp16"}.get(layer.kind, layer.kind)) if layer.quantized
                else w.to({"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[layer.kind]).float())
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.array_equal(got.astype(np.float32).view(np.uint32), want.numpy().view(np.uint32)), t.name
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        kind = plan.role_type(name)
        assert types[name] == kind
        if kind not in export.KEEP_TYPES:  # quantized as asked: the project's RTN of the checkpoint's tensor
            w = weights.get(hf, weights["model.embed_tokens.weight"])
            got = gguf.quants.dequantize(by_name[name].data, by_name[name].tensor_type).reshape(w.shape)
            assert np.array_equal(got.view(np.uint32), rtn_quantize(w, kind).numpy().view(np.uint32)), name
    for t in src.tensors:  # norms as the converter wrote them
        if len(t.data.shape) == 1:
            assert types[t.name] == "f32" and np.array_equal(by_name[t.name].data, t.data)
    fields = {f.name: (f.types, f.contents()) for f in out.fields.values() if not f.name.startswith("GGUF.")}
    before = {f.name: (f.types, f.contents()) for f in src.fields.values() if not f.name.startswith("GGUF.")}
    ftype = fields.pop("general.file_type")
    assert ftype[1] == int(getattr(gguf.LlamaFileType, plan.file_type))
    before.pop("general.file_type")
    assert list(fields) == list(before) and fields == before  # every key/value field, its type, its order
    return types


def test_q8_0_file(cached_convert, tmp_path):
    plan = export.plan_export(MODEL, "q8_0-rtn")
    result = export.export_gguf(plan, tmp_path / "m.gguf", progress=False)
    types = _check_file(result.path, cached_convert, plan)
    assert sum(k == "q8_0" for k in types.values()) == 21 and result.kept == ("token_embd.weight", "output.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left


def test_embedding_and_output_types(cached_convert, tmp_path, capsys):
    """--embedding-type / --output-type: those tensors in the asked llama.cpp type, bit-exact with the project's RTN
    of the checkpoint's tensors, and named so in llama-quantize's command."""
    plan = export.plan_export(MODEL, "q4_0-rtn", embedding_type="q8_0", output_type="Q5_0")
    assert (plan.role_type("token_embd.weight"), plan.role_type("output.weight")) == ("q8_0", "q5_0")
    result = export.export_gguf(plan, tmp_path / "m.gguf", progress=False)
    types = _check_file(result.path, cached_convert, plan)
    assert types["token_embd.weight"] == "q8_0" and types["output.weight"] == "q5_0"
    command = export.llama_quantize_command(result)
    assert "--token-embedding-type q8_0" in command and "--output-tensor-type q5_0" in command
    out = tmp_path / "cli.gguf"
    assert main(["export", MODEL, "--recipe", "q4_0-rtn", "--embedding-type", "q8_0", "--gguf", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "token_embd.weight in Q8_0, as asked" in text and "kept in F16: output.weight" in text


def test_per_layer_mix_file(cached_convert, tmp_path):
    """An explicit per-layer list of many types (the rows of 96 take 32-blocks; ffn_down's 256 the k-quants), the
    mixes' fp16 and a skipped layer kept in bf16."""
    from quantpredict.recipe import Recipe

    n = len(export.plan_export(MODEL, "q8_0-rtn").layers)  # 7 per block: q, k, v, o, gate, up, down
    small = ["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q8_0", "fp16"]
    down = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"]
    formats = [(down[i // 7 % 6] if i % 7 == 6 else small[(i + i // 7) % 7], None) for i in range(n)]
    formats[1] = ("skip", None)
    recipe = Recipe("q4_0", layer_formats=formats)
    plan = export.plan_export(MODEL, recipe.label, keep="bf16")
    result = export.export_gguf(plan, tmp_path / "sub" / "m.gguf", progress=False)
    types = _check_file(result.path, cached_convert, plan)
    assert types["blk.0.attn_k.weight"] == "bf16" and {"q2_k", "iq4_nl", "f16"} <= set(types.values())
    assert "--tensor-type" in export.llama_quantize_command(result)


def test_recipe_file_from_allocate(cached_convert, tmp_path, capsys):
    plan = export.plan_export(MODEL, "q5_k_m")
    from quantpredict.recipe import Recipe

    doc = {"model": MODEL, "recipe": plan.recipe_label, "recipe_fields": Recipe.from_label(plan.recipe_label).to_dict()}
    (tmp_path / "alloc.json").write_text(json.dumps(doc))
    assert main(["export", MODEL, "--recipe-file", str(tmp_path / "alloc.json"), "--gguf", str(tmp_path / "a.gguf"),
                 "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mix"] == "q5_k_m" and out["file_type"] == "MOSTLY_Q5_K_M" and out["kept"] == ["token_embd.weight",
                                                                                                "output.weight"]
    assert out["llama_quantize"].startswith("llama-quantize --token-embedding-type f16 --output-tensor-type f16")


def test_interrupt_leaves_nothing(cached_convert, tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    (tmp_path / "old.gguf").write_bytes(b"an older file")
    before = _tree(tmp_path)
    monkeypatch.setattr(export, "rewrite", interrupt)
    assert main(["export", MODEL, "--recipe", "q8_0-rtn", "--gguf", str(tmp_path / "new" / "m.gguf")]) == 130
    assert main(["export", MODEL, "--recipe", "q8_0-rtn", "--gguf", str(tmp_path / "old.gguf"), "--force"]) == 130
    assert _tree(tmp_path) == before  # no temporary folder, no made folder, the old file untouched
    capsys.readouterr()


@needs_converter
def test_unsupported_architecture_is_refused(tmp_path, capsys):
    assert main(["export", "opt-xs", "--recipe", "q8_0-rtn", "--gguf", str(tmp_path / "o.gguf")]) == 2
    assert "OPTForCausalLM" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,words", [
    (["--recipe", "q4_k_m-gptq"], "RTN"),
    (["--recipe", "mxint4-rtn"], "not a llama.cpp type"),
    (["--recipe", "q4_k-rtn"], "q5_0"),
    (["--recipe", "zzz9-rtn"], "zzz9"),
    (["--recipe-file", "missing.json"], "missing.json"),
    (["--recipe-file", "two.txt"], "2 recipes"),
    (["--recipe", "q8_0-rtn", "--gguf", "exists.gguf"], "--force"),
    (["--recipe", "q8_0-rtn", "--gguf", "afile/m.gguf"], "afile"),
    (["--recipe", "q8_0-rtn", "--embedding-type", "q9_9"], "q9_9"),
    (["--recipe", "q8_0-rtn", "--embedding-type", "q6_k"], "q8_0"),  # rows of 96: llama.cpp's fallback named
    (["--recipe", "q8_0-rtn", "--output-type", "mxint4"], "llama.cpp type"),
])
def test_errors_exit_2_and_write_nothing(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    (tmp_path / "two.txt").write_text("q8_0-rtn\nq4_0-rtn\n")
    (tmp_path / "exists.gguf").write_text("not to be replaced\n")
    (tmp_path / "afile").write_text("a file\n")
    if "--gguf" not in argv:
        argv = [*argv, "--gguf", "m.gguf"]
    before = _tree(tmp_path)
    assert main(["export", MODEL, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert _tree(tmp_path) == before


def test_missing_converter_package_is_one_error_before_any_work(tmp_path, monkeypatch, capsys):
    """A package the converter imports is missing: exit 2 naming it and the extra, before the sdist is fetched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    monkeypatch.setattr(export, "CONVERTER_PACKAGES", ("sentencepiece", "no_such_package_qp"))
    assert "no_such_package_qp" in export.converter_missing_packages() and not export.converter_available()
    assert main(["export", MODEL, "--recipe", "q8_0-rtn", "--gguf", "m.gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_package_qp" in err[0] and "quantpredict[export]" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_converter_failure_is_one_error(tmp_path, monkeypatch):
    """A converter that fails: its last lines in the error, no file left."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "convert_hf_to_gguf.py").write_text("import sys\nprint('something broke', file=sys.stderr)\nsys.exit(3)\n")
    (src / "conversion").mkdir()
    with pytest.raises(ModelError, match="something broke"):
        export.convert(tmp_path, tmp_path / "out.gguf", src=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- the real converter and llama.cpp's tools -------------------------------------------------------------------


@needs_converter
def test_cli_export_q4_k_m(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", MODEL, "--recipe", "q4_k_m", "--gguf", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "file type Q4_K_M" in text and "kept in F16: token_embd.weight, output.weight" in text
    assert "llama-quantize --token-embedding-type f16" in text and "gpt-2" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.2.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q5_0"


@needs_converter
@pytest.mark.skipif(_tool("llama-perplexity") is None or _tool("llama-quantize") is None,
                    reason="llama.cpp's tools are not built (benchmarks/llamacpp_reference.py build)")
def test_llama_cpp_loads_the_file_and_llama_quantize_writes_the_same(tmp_path, capsys):
    """llama-perplexity runs 2 chunks on the exported file; the printed llama-quantize command, run on the
    converter's F32 file, writes the same tensors byte for byte and the same fields (tools built with
    -ffp-contract=off)."""
    import gguf

    from quantpredict.models import resolve

    out = tmp_path / "m.gguf"
    assert main(["export", MODEL, "--recipe", "q4_k_m", "--gguf", str(out), "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not text.is_file():
        pytest.skip("no WikiText-2 raw text")
    done = subprocess.run([str(_tool("llama-perplexity")), "-m", str(out), "-f", str(text), "--chunks", "2", "-c",
                           "128", "-t", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Final estimate: PPL" in done.stdout + done.stderr, done.stderr[-2000:]
    f32 = tmp_path / "f32.gguf"
    export.convert(resolve(MODEL), f32)
    cmd = shlex.split(doc["llama_quantize"])
    cmd[0], cmd[-3], cmd[-2] = str(_tool("llama-quantize")), str(f32), str(tmp_path / "lq.gguf")
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    ours, theirs = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(tmp_path / "lq.gguf"))
    tb = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        assert t.tensor_type == tb[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)), t.name
    assert ({f.name: f.contents() for f in ours.fields.values() if not f.name.startswith("GGUF.")}
            == {f.name: f.contents() for f in theirs.fields.values() if not f.name.startswith("GGUF.")})


# ---- with an importance matrix --------------------------------------------------------------------------------------


def _random_imatrix(path: Path, *, drop: tuple[str, ...] = (), extra: dict | None = None, seed: int = 0) -> Path:
    """An imatrix of llama-s's linear tensors with random positive sums (counts 512), written as llama-imatrix
    writes it; ``drop``: tensors left out; ``extra``: more entries (GGUF name -> row length)."""
    from quantpredict.imatrix import Imatrix, ImatrixEntry, write_imatrix

    plan = export.plan_export(MODEL, "q8_0-rtn")
    rows = {export.gguf_names(plan, "llama", 3)[layer.name]: layer.in_features for layer in plan.layers}
    rows |= extra or {}
    rng = np.random.default_rng(seed)
    entries = {name: ImatrixEntry(rng.gamma(0.7, size=(1, n)).astype(np.float32) * 512, np.array([512]))
               for name, n in rows.items() if name not in drop}
    return write_imatrix(Imatrix(entries, datasets=("random",), chunk_count=1, chunk_size=512), path)


def _many_types_recipe(shift: int) -> str:
    """A per-layer recipe of many weighted quantizers on llama-s: the 32-blocks on the rows of 96, three of the six
    256-blocks on the three ffn_down (rows of 256): ``shift`` 0 the first three, 3 the others."""
    from quantpredict.recipe import Recipe

    n = len(export.plan_export(MODEL, "q8_0-rtn").layers)
    small = ["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q8_0", "fp16"]
    down = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"]
    return Recipe("q4_0", layer_formats=[(down[(i // 7 + shift) % 6] if i % 7 == 6 else small[(i + i // 7) % 7], None)
                                         for i in range(n)]).label


@pytest.mark.parametrize("shift", [0, 3])
def test_imatrix_file_is_the_weighted_quantization(cached_convert, tmp_path, shift):
    """Every tensor of a llama.cpp type quantized with its quant_weights (the converter's q/k row permutation
    applies to the weights' rows only: the column weights stand), the token embedding with its entry, the output
    head without one (no entry: as llama-quantize), the fp16 layers as without an imatrix."""
    import gguf
    import torch

    from quantpredict.formats.ggml_imatrix import fake_quantize_weighted
    from quantpredict.imatrix import quant_weights, read_imatrix
    from quantpredict.quantize.rtn import rtn_quantize

    imx = _random_imatrix(tmp_path / "imatrix.gguf", extra={"token_embd.weight": 96})
    im = read_imatrix(imx)
    plan = export.plan_export(MODEL, _many_types_recipe(shift), embedding_type="q5_0", output_type="q4_0", imatrix=imx)
    assert plan.imatrix_file == str(imx) and plan.imatrix_label.startswith("imatrix.gguf@")
    assert "token_embd.weight" in plan.imatrix_weights and "output.weight" not in plan.imatrix_weights
    result = export.export_gguf(plan, tmp_path / "m.gguf", progress=False)
    assert f"--imatrix {imx}" in export.llama_quantize_command(result)
    out = {t.name: t for t in gguf.GGUFReader(str(result.path)).tensors}
    names = export.gguf_names(plan, "llama", 3)
    weights = _hf_weights()
    cfg = json.loads((plan.model_dir / "config.json").read_text())
    checked = set()
    for layer in plan.layers:
        w = weights[layer.name + ".weight"]
        if layer.name.endswith(("q_proj", "k_proj")):
            w = _permute(w, cfg["num_attention_heads" if layer.name.endswith("q_proj") else "num_key_value_heads"])
        name = names[layer.name]
        if layer.kind == "f16":
            want = w.to(torch.float16).float()
        else:
            want = fake_quantize_weighted(w, layer.kind, quant_weights(im, name))
            checked.add(layer.kind)
        t = out[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.array_equal(got.astype(np.float32).view(np.uint32), want.numpy().view(np.uint32)), name
    assert {"q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q8_0"} <= checked
    assert set(["q2_k", "q3_k", "q4_k"] if shift == 0 else ["q5_k", "q6_k", "iq4_xs"]) <= checked
    for name, hf, kind, qw in (("token_embd.weight", "model.embed_tokens.weight", "q5_0",
                                quant_weights(im, "token_embd.weight")), ("output.weight", "lm_head.weight", "q4_0",
                                                                          None)):
        w = weights.get(hf, weights["model.embed_tokens.weight"])
        want = rtn_quantize(w, kind) if qw is None else fake_quantize_weighted(w, kind, qw)
        got = gguf.quants.dequantize(out[name].data, out[name].tensor_type).reshape(w.shape)
        assert np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32)), name


def test_imatrix_without_a_layer_is_one_error_before_any_work(tmp_path, monkeypatch, capsys):
    """An imatrix missing a linear of a llama.cpp type: exit 2 naming the file and the tensor, before the converter
    is looked for; a missing, unreadable or malformed file likewise."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home-never-created"))
    imx = _random_imatrix(tmp_path / "partial.gguf", drop=("blk.1.ffn_up.weight",))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    before = _tree(tmp_path)
    for path, words in ((imx, "blk.1.ffn_up.weight"), (tmp_path / "none.gguf", "none.gguf"),
                        (tmp_path / "bad.gguf", "bad.gguf")):
        assert main(["export", MODEL, "--recipe", "q4_0-rtn", "--imatrix", str(path), "--gguf", "m.gguf"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and str(path.name) in err[0], err
    assert _tree(tmp_path) == before
    # a layer left in F16 needs no entry (ggml's float types ignore the imatrix)
    from quantpredict.recipe import Recipe

    n = len(export.plan_export(MODEL, "q8_0-rtn").layers)
    formats = [("q4_0", None)] * n
    formats[12] = ("fp16", None)  # model.layers.1.mlp.up_proj
    plan = export.plan_export(MODEL, Recipe("q4_0", layer_formats=formats).label, imatrix=imx)
    assert plan.layers[12].name == "model.layers.1.mlp.up_proj" and len(plan.imatrix_weights) == n - 1


@needs_converter
@pytest.mark.skipif(_tool("llama-quantize") is None, reason="llama-quantize is not built "
                    "(benchmarks/llamacpp_reference.py build)")
@pytest.mark.parametrize("shift", [0, 3])
def test_llama_quantize_with_the_same_imatrix_writes_the_same(tmp_path, capsys, shift):
    """One imatrix file given to `quantpredict export --imatrix` and to the printed `llama-quantize --imatrix`
    command: every tensor's bytes identical, for every weighted quantizer and a quantized token embedding with its
    entry (tools built with -ffp-contract=off)."""
    import gguf

    from quantpredict.models import resolve

    imx = _random_imatrix(tmp_path / "imatrix.gguf", extra={"token_embd.weight": 96}, seed=1)
    out = tmp_path / "m.gguf"
    recipe = _many_types_recipe(shift)
    (tmp_path / "r.txt").write_text(recipe + "\n")
    assert main(["export", MODEL, "--recipe-file", str(tmp_path / "r.txt"), "--embedding-type", "iq4_nl",
                 "--output-type", "q5_1", "--imatrix", str(imx), "--gguf", str(out), "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["imatrix"].startswith("imatrix.gguf@") and "--imatrix" in doc["llama_quantize"]
    f32 = tmp_path / "f32.gguf"
    export.convert(resolve(MODEL), f32)
    cmd = shlex.split(doc["llama_quantize"])
    cmd[0], cmd[-3], cmd[-2] = str(_tool("llama-quantize")), str(f32), str(tmp_path / "lq.gguf")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(tmp_path / "lq.gguf"))
    tb = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        assert t.tensor_type == tb[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[t.name].data).view(np.uint8)), t.name
