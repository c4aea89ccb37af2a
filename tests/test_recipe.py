"""The torch-free recipe contract: labels that parse back, per-layer formats, QAT as an option, the evaluation
setting, and errors that name the input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantpredict.errors import FormatError, RecipeError
from quantpredict.recipe import EvalSetting, LayerRule, Recipe, mixed_recipe

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
         "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("recipe", [
    Recipe("mxint4", method="gptq", layers=("mlp.down_proj=mxint8",)),
    Recipe("int4", block_size=128, layers=(LayerRule("*.0.*", "skip"), LayerRule("q_proj", "mxfp4_e2m1", 16))),
    Recipe("mxint4", layer_formats=("mxint4", "mxint4", "mxint8", ("int4", 128), "skip", "skip", "skip")),
    Recipe("int3", method="gptq", qat=True, qat_lr=1e-4, qat_steps=32, qat_batch_size=4, seed=2),
    Recipe("nf4", awq=True, smoothquant_alpha=None),
])
def test_labels_round_trip(recipe):
    assert Recipe.from_label(recipe.label) == recipe
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert Recipe.coerce(recipe.label) == recipe == Recipe.coerce(recipe.to_dict())


def test_label_grammar_by_hand():
    over = Recipe("mxint4", method="gptq", layers=("mlp.down_proj=mxint8",))
    assert over.label == "mxint4-gptq-@mlp.down_proj=mxint8"
    listed = Recipe("mxint4", layer_formats=("mxint4", "mxint4", "mxint4", "mxint8"))
    assert listed.label == "mxint4-rtn-L=mxint4*3,mxint8"
    assert Recipe("int4", method="rtn", qat=True).label == "int4-qat"
    assert Recipe("int4", method="gptq", qat=True, qat_lr=1e-4).label == "int4-qat_gptq-qlr0.0001"
    # an old label keeps its meaning: fields added later appear only when they differ from their defaults
    assert Recipe.from_label("mxfp4_e2m1-gptq-sq0.5-a_mxint8").to_dict() == {
        "weight_format": "mxfp4_e2m1", "block_size": None, "method": "gptq", "smoothquant_alpha": 0.5,
        "act_format": "mxint8", "act_block_size": None, "calib_samples": 128, "calib_seq_len": 256,
        "gptq_blocksize": 128, "percdamp": 0.01, "act_order": False, "skip": [], "seed": 0}


def test_per_layer_formats_first_match_wins_then_skip_then_default():
    r = Recipe("mxint4", layers=("down_proj=mxint8", "*.1.*=skip"), skip=("layers.0.self_attn.q_proj",))
    assert r.layer_formats_for(NAMES) == [None, ("mxint8", 32), None, ("mxint8", 32)]
    explicit = mixed_recipe(Recipe("mxint4", method="gptq"), ["mxint3", "skip", "int4_b128", "mxint8"])
    assert explicit.method == "gptq" and explicit.layer_formats_for(NAMES) == [
        ("mxint3", 32), None, ("int4", 128), ("mxint8", 32)]
    with pytest.raises(RecipeError, match="lists 4 per-layer formats, but the model has 3 linear layers"):
        explicit.layer_formats_for(NAMES[:3])


def test_qat_is_an_option_and_the_method_column_keeps_its_names():
    r = Recipe.from_label("mxint4_b128-qat_gptq")
    assert (r.method, r.qat, r.method_name, r.block_size) == ("gptq", True, "qat_gptq", 128)
    assert r.columns()["method"] == "qat_gptq"
    with pytest.raises(RecipeError, match=r"QAT is the option qat=True"):
        Recipe("int4", method="qat")


def test_eval_setting_labels():
    assert EvalSetting(256, 256).label == "seq256-w256"
    assert EvalSetting(256).label == "seq256-wall"
    assert EvalSetting(128, 64, bos=True, text="0123456789ab").label == "seq128-w64-bos-txt0123456789ab"
    for s in ("seq256-w256", "seq256-wall-bos", "seq64-w8-txtabcdefabcdef"):
        assert EvalSetting.from_label(s).label == s
    with pytest.raises(RecipeError, match="seqN-wM"):
        EvalSetting.from_label("w256")


@pytest.mark.parametrize("bad, match", [
    (lambda: Recipe("mxint4", method="awq"), "unknown quantization method 'awq'"),
    (lambda: Recipe("mxint4", layers=("mlp-down=mxint8",)), "without any of"),
    (lambda: Recipe("mxint4", layers=("down_proj",)), "must read PATTERN=FORMAT"),
    (lambda: Recipe.from_label("mxint4-rtn-L=mxint4*x"), r"FORMAT\[_bN\]\[\*COUNT\]"),
    (lambda: Recipe("mxint4", qat_lr=0), "qat_lr must be > 0"),
    (lambda: Recipe.from_dict({"weight_format": "mxint4", "colour": "red"}), "unknown field"),
    (lambda: Recipe.from_dict({"method": "gptq"}), "has no weight_format"),
    (lambda: Recipe.coerce(3.5), "expected a Recipe, a recipe label or a dict"),
])
def test_bad_recipes_raise_recipe_errors_naming_the_input(bad, match):
    with pytest.raises(RecipeError, match=match):
        bad()


def test_unknown_formats_and_block_sizes_are_format_errors():
    with pytest.raises(FormatError, match="unknown format"):
        Recipe("mxint4", layers=("down_proj=mxint99",))
    with pytest.raises(FormatError, match="block_size"):
        Recipe("mxint4", block_size=0)


def test_the_recipe_module_needs_no_torch():
    code = ("import sys; from quantpredict.recipe import Recipe; Recipe.from_label('q4_k-gptq-L=q4_k*2,q6_k');"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
