"""Recipes priced with an importance matrix (``recipe_row(..., imatrix=)``, ``rank --imatrix``, ``predict
--imatrix``): the RTN of every llama.cpp-typed layer is llama-quantize's weighted quantization with the imatrix's
quant_weights (by the layer's GGUF name), ``imatrix=None`` prices exactly as before, and what llama.cpp does not do
with an imatrix (GPTQ, non-llama.cpp formats) is refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantpredict.errors import DataError, RecipeError
from quantpredict.recipe import Recipe

MODEL = "llama-s"


@pytest.fixture(scope="module")
def mp():
    from quantpredict.models import zoo_root
    from quantpredict.predict.rank import profile_model

    if not (zoo_root() / MODEL / "model.safetensors").exists():
        pytest.skip(f"zoo model {MODEL} absent")
    return profile_model(MODEL)


def _gguf_names(mp) -> dict[str, str]:
    from quantpredict.export import gguf_tensor_names

    return gguf_tensor_names("llama", 3, [r.name for r in mp.refs])


@pytest.fixture(scope="module")
def imatrix_file(mp, tmp_path_factory):
    """llama-s's linear tensors with random positive sums, as llama-imatrix writes them."""
    from quantpredict.imatrix import Imatrix, ImatrixEntry, write_imatrix

    names = _gguf_names(mp)
    rng = np.random.default_rng(0)
    entries = {names[r.name]: ImatrixEntry(rng.gamma(0.5, size=(1, r.in_features)).astype(np.float32) * 100,
                                           np.array([100])) for r in mp.refs}
    return write_imatrix(Imatrix(entries, datasets=("random",), chunk_count=1, chunk_size=100),
                         tmp_path_factory.mktemp("imx") / "imatrix.gguf")


def _formats(mp, r):
    from quantpredict.quantize import layer_plan

    planned = {p.ref.name: (p.weight_format, p.block_size) for p in layer_plan(mp.model, r)}
    return [planned.get(x.name) for x in mp.refs]


def test_imatrix_none_prices_as_before(mp):
    """``imatrix=None`` takes the unweighted path: the same floats as profile_deltas without importance."""
    from quantpredict.features.fisher import price_deltas, profile_deltas
    from quantpredict.mixes import resolve_recipe
    from quantpredict.predict.rank import recipe_row

    for spec in ("q4_k_m", "mxint4-rtn"):
        r = resolve_recipe(spec, mp.model)
        a, b = recipe_row(mp, r), recipe_row(mp, r, imatrix=None)
        want = price_deltas(mp.profile, [x.name for x in mp.refs],
                            profile_deltas(mp.refs, _formats(mp, r), "rtn", mp.profile), kfac=False)
        assert all(a[k] == v and b[k] == v for k, v in want.items() if v == v)
        a.pop("price_seconds"), b.pop("price_seconds")
        assert a == b or all((a[k] == b[k]) or (a[k] != a[k] and b[k] != b[k]) for k in a)
        assert a["imatrix"] is None


def test_imatrix_prices_llama_quantize_s_weighted_rtn(mp, imatrix_file):
    """Each layer's delta is fake_quantize_weighted with quant_weights of its GGUF tensor; the fp16 layers of a mix
    (ggml's F16 ignores the imatrix) and the others as without; the row names the file."""
    from quantpredict.features.fisher import price_deltas
    from quantpredict.formats.ggml_imatrix import fake_quantize_weighted
    from quantpredict.imatrix import quant_weights, read_imatrix
    from quantpredict.mixes import resolve_recipe
    from quantpredict.predict.rank import recipe_row
    from quantpredict.quantize.rtn import rtn_quantize

    im, names = read_imatrix(imatrix_file), _gguf_names(mp)
    for spec in ("q4_k_m", "q4_0-rtn", "iq4_xs_mix"):
        r = resolve_recipe(spec, mp.model)
        row, plain = recipe_row(mp, r, imatrix=imatrix_file), recipe_row(mp, r)
        deltas = []
        for ref, fb in zip(mp.refs, _formats(mp, r)):
            w = ref.weight.detach().float()
            if fb is None:
                deltas.append(None)
            elif fb[0] in ("fp16", "bf16"):
                deltas.append(rtn_quantize(w, fb[0]) - w)
            else:
                deltas.append(fake_quantize_weighted(w, fb[0], quant_weights(im, names[ref.name])) - w)
        want = price_deltas(mp.profile, [x.name for x in mp.refs], deltas, kfac=False)
        assert all(row[k] == v for k, v in want.items() if v == v), spec
        assert row["token_gn_quad"] != plain["token_gn_quad"]
        assert row["imatrix"].startswith("imatrix.gguf@") and len(row["imatrix"]) == len("imatrix.gguf@") + 12
    # the runtime's activation rounding on top of the weighted weights
    r = Recipe("q4_0")
    run = recipe_row(mp, r, runtime="llama.cpp-cpu", imatrix=imatrix_file)
    assert run["act_weight_quad"] == recipe_row(mp, r, imatrix=imatrix_file)["token_gn_quad"]


def test_imatrix_refusals(mp, imatrix_file, tmp_path):
    from quantpredict.imatrix import Imatrix, ImatrixEntry, write_imatrix
    from quantpredict.predict.rank import recipe_row

    with pytest.raises(RecipeError, match="GPTQ"):
        recipe_row(mp, Recipe("q4_0", method="gptq"), imatrix=imatrix_file)
    with pytest.raises(RecipeError, match="mxint4 is not one"):
        recipe_row(mp, Recipe("mxint4"), imatrix=imatrix_file)
    with pytest.raises(RecipeError, match="SmoothQuant"):
        recipe_row(mp, Recipe("q8_0", smoothquant_alpha=0.5, act_format="mxint8"), imatrix=imatrix_file)
    names = _gguf_names(mp)
    partial = write_imatrix(Imatrix({names[r.name]: ImatrixEntry(np.ones((1, r.in_features)), np.array([1]))
                                     for r in mp.refs[1:]}), tmp_path / "partial.gguf")
    with pytest.raises(DataError, match=r"partial\.gguf.*blk\.0\.attn_q\.weight"):
        recipe_row(mp, Recipe("q4_0"), imatrix=partial)


def test_cli_rank_and_predict_label_the_imatrix(mp, imatrix_file, capsys):
    from quantpredict.cli import main

    assert main(["predict", MODEL, "--format", "q4_0", "--imatrix", str(imatrix_file)]) == 0
    assert "with the imatrix imatrix.gguf@" in capsys.readouterr().out
    assert main(["predict", MODEL, "--format", "q4_0", "--imatrix", str(imatrix_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["imatrix"].startswith("imatrix.gguf@")
    assert main(["rank", MODEL, "--formats", "q4_0,q8_0", "--imatrix", str(imatrix_file), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["imatrix"].startswith("imatrix.gguf@") and len(ranked["candidates"]) == 2  # --methods: rtn
    assert main(["rank", MODEL, "--recipes", "q4_k_m", "--imatrix", str(imatrix_file)]) == 0
    assert "with the imatrix imatrix.gguf@" in capsys.readouterr().out
    # refused: the default grid's MX formats, GPTQ, a measurement, a missing file
    assert main(["rank", MODEL, "--imatrix", str(imatrix_file)]) == 2
    assert "not one" in capsys.readouterr().err
    assert main(["rank", MODEL, "--recipes", "q4_0-gptq", "--imatrix", str(imatrix_file)]) == 2
    assert "GPTQ" in capsys.readouterr().err
    assert main(["predict", MODEL, "--format", "q4_0", "--imatrix", str(imatrix_file), "--measure"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["predict", MODEL, "--format", "q4_0", "--imatrix", "no-such.gguf"]) == 2
    assert "no-such.gguf" in capsys.readouterr().err
