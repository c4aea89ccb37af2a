"""``quantpredict imatrix``: llama.cpp's importance matrix computed by the project (quantpredict.imatrix.
compute_imatrix) on llama-s: the sums and counts against a float64 recomputation, the file through read_imatrix and
export --imatrix, the CLI's refusals, and, with llama-imatrix built, the same text through both tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantpredict import export
from quantpredict.cli import main

MODEL = "llama-s"


@pytest.fixture(scope="module")
def model():
    from quantpredict import models
    from quantpredict.models import zoo_root

    if not (zoo_root() / MODEL / "model.safetensors").exists():
        pytest.skip(f"zoo model {MODEL} absent")
    return models.load(MODEL)


def _windows(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    from quantpredict.quantize import sample_calibration

    return sample_calibration(tokenizer, n, seq_len, seed=0)


def test_sums_and_counts_are_the_squared_inputs(model):
    """Each entry: the float64 sum over every token of its layer's input squared, per column, in float32; counts
    the tokens; q/k/v (and gate/up) read the same input, so their sums are equal; GGUF names."""
    from quantpredict import arch
    from quantpredict.imatrix import compute_imatrix

    net, tok = model
    windows = _windows(tok, 3, 32)
    im = compute_imatrix(net, windows, batch_size=2, datasets=("wikitext2:train",))
    refs = arch.linear_layers(net)
    inputs: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}
    handles = [r.module.register_forward_hook(lambda m, a, o, name=r.name: inputs[name].append(a[0].detach()))
               for r in refs]
    with torch.inference_mode():
        for w in windows:  # one window at a time: the sums do not depend on the batching
            net(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    names = export.gguf_tensor_names("llama", 3, [r.name for r in refs])
    assert sorted(im.names) == sorted(names.values()) and (im.chunk_count, im.chunk_size) == (3, 32)
    for r in refs:
        x = torch.cat([t.reshape(-1, r.in_features) for t in inputs[r.name]]).double()
        want = (x * x).sum(0).float().numpy()
        e = im.entries[names[r.name]]
        np.testing.assert_allclose(e.sums[0], want, rtol=1e-6)  # batch 2 vs 1: float32 activations may differ
        assert e.counts.tolist() == [3 * 32]
    e = im.entries
    assert np.array_equal(e["blk.1.attn_q.weight"].sums, e["blk.1.attn_v.weight"].sums)
    assert np.array_equal(e["blk.2.ffn_gate.weight"].sums, e["blk.2.ffn_up.weight"].sums)
    # one window at a time: exactly the recomputation (same activations, float64 sums rounded once)
    one = compute_imatrix(net, windows, batch_size=1)
    for r in refs:
        x = torch.cat([t.reshape(-1, r.in_features) for t in inputs[r.name]]).double()
        assert np.array_equal(one.entries[names[r.name]].sums[0], (x * x).sum(0).float().numpy()), r.name


def test_cli_writes_a_file_read_imatrix_and_export_take(model, tmp_path, capsys, monkeypatch):
    from quantpredict.imatrix import compute_imatrix, quant_weights, read_imatrix

    net, tok = model
    out = tmp_path / "sub" / "im.gguf"
    argv = ["imatrix", MODEL, "--out", str(out), "--calib-samples", "3", "--calib-seq-len", "32", "--no-progress",
            "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["entries"] == 21 and doc["tokens"] == 96 and doc["imatrix"].startswith("im.gguf@")
    assert sorted(p.name for p in out.parent.iterdir()) == ["im.gguf"]  # no temporary left
    got, want = read_imatrix(out), compute_imatrix(net, _windows(tok, 3, 32), batch_size=8)
    assert got.names == want.names and got.datasets == ("wikitext2:train",) and got.chunk_size == 32
    for name in got.names:
        assert np.array_equal(got.entries[name].sums, want.entries[name].sums)
        assert np.array_equal(quant_weights(got, name), quant_weights(want, name))
    plan = export.plan_export(MODEL, "q4_k_m", imatrix=out)  # every linear has its entry
    assert len(plan.imatrix_weights) == 21
    # refusals: exit 2, one line, nothing written
    before = sorted(p.name for p in out.parent.iterdir())
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal: exit 2, one line
        main([*argv[:3], str(tmp_path / "x.gguf"), "--calib-seq-len", "8"])
    assert exc.value.code == 2 and "at least 16" in capsys.readouterr().err
    assert main([*argv[:3], str(tmp_path / "y.gguf"), "--calib-text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == before and not (tmp_path / "x.gguf").exists()
    assert main([*argv, "--force"]) == 0 and "wrote" in capsys.readouterr().out


def _tool(name: str) -> Path | None:
    p = export.llama_cpp_home() / f"build-{export.LLAMA_CPP_PYTHON}" / "bin" / name
    return p if p.is_file() else None


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.skipif(not export.converter_available() or _tool("llama-imatrix") is None,
                    reason="llama.cpp's converter or llama-imatrix is not here (benchmarks/llamacpp_reference.py "
                           "build)")
def test_llama_imatrix_on_the_same_text_agrees(model, tmp_path):
    """The same text through llama-imatrix (on the converter's F32 file) and compute_imatrix (on the HF model):
    chunks of 64 tokens cut in order from the text's tokens, the first of each set to BOS, as llama-imatrix does.
    The tokenizations may differ (llama.cpp's gpt-2 pre-tokenizer against the HF tokenizer's; chunk boundaries then
    move), and the float32 forwards do (ggml's against PyTorch's; float32 against float64 sums); per tensor, the
    quant_weights' rank correlation exceeds 0.999 and their median relative difference is under 1e-3 (measured: at
    least 0.999998 and at most 8e-5, the counts equal: 1024 tokens in 16 chunks of 64)."""
    from quantpredict.data import eval_protocol
    from quantpredict.imatrix import compute_imatrix, quant_weights, read_imatrix
    from quantpredict.models import resolve

    net, tok = model
    src = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not src.is_file():
        pytest.skip("no WikiText-2 raw text")
    text = tmp_path / "text.txt"
    text.write_text(src.read_text()[:40000])
    n_ctx, chunks = 64, 16
    f32 = tmp_path / "f32.gguf"
    export.convert(resolve(MODEL), f32)
    theirs = tmp_path / "llama.gguf"
    done = subprocess.run([str(_tool("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o", str(theirs),
                           "--chunks", str(chunks), "-c", str(n_ctx), "-t", "1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = tok(text.read_text(), add_special_tokens=True)["input_ids"]
    windows = torch.tensor(ids[: chunks * n_ctx]).reshape(chunks, n_ctx)
    bos = eval_protocol(tok).bos_id
    if bos is not None:
        windows[:, 0] = bos
    ours = compute_imatrix(net, windows, batch_size=4)
    llama = read_imatrix(theirs)
    assert set(llama.names) == set(ours.names)
    for name in ours.names:
        a, b = quant_weights(ours, name), quant_weights(llama, name)
        assert _spearman(a, b) > 0.999, name
        assert np.median(np.abs(a - b) / b) < 1e-3, name
        assert ours.entries[name].counts.tolist() == llama.entries[name].counts.tolist() == [chunks * n_ctx]


def test_quantize_with_an_imatrix_records_it(model, tmp_path, capsys):
    """`quantize --imatrix`: each layer's saved weight is llama-quantize's weighted RTN of the checkpoint's, and
    quantization.json names the imatrix; GPTQ with one is refused before the weights load."""
    from safetensors.torch import load_file

    from quantpredict.formats.ggml_imatrix import fake_quantize_weighted
    from quantpredict.imatrix import compute_imatrix, quant_weights, write_imatrix
    from quantpredict.models import resolve

    net, tok = model
    imx = write_imatrix(compute_imatrix(net, _windows(tok, 2, 32)), tmp_path / "im.gguf")
    out = tmp_path / "q"
    assert main(["quantize", MODEL, "--format", "q4_0", "--method", "rtn", "--imatrix", str(imx), "--out",
                 str(out)]) == 0
    capsys.readouterr()
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["imatrix"].startswith("im.gguf@") and meta["label"] == "q4_0-rtn"
    saved, orig = load_file(str(out / "model.safetensors")), load_file(str(resolve(MODEL) / "model.safetensors"))
    from quantpredict.imatrix import read_imatrix

    im = read_imatrix(imx)
    names = export.gguf_tensor_names("llama", 3, [k.removesuffix(".weight") for k in orig if "layers" in k
                                                  and k.endswith("proj.weight")])
    for hf, name in names.items():
        want = fake_quantize_weighted(orig[hf + ".weight"].float(), "q4_0", quant_weights(im, name))
        assert torch.equal(saved[hf + ".weight"].float(), want), hf
    assert main(["quantize", MODEL, "--format", "q4_0", "--imatrix", str(imx), "--out", str(tmp_path / "g")]) == 2
    assert "GPTQ" in capsys.readouterr().err and not (tmp_path / "g").exists()
