"""SweepGrid: a sweep's axes as one frozen value, planning exactly what plan_runs and collect plan."""

from __future__ import annotations

import dataclasses

import pytest

from quantpredict.errors import QuantpredictError, RecipeError
from quantpredict.recipe import EvalSetting
from quantpredict.runs import RunStore, SweepGrid, collect, plan_runs, plan_sweep

FAKE = "quantpredict.runs.fake:fake_run"
AXES = dict(formats=["mxint4", "int8"], methods=["rtn", "gptq", "qat"], smoothquant=[None, 0.5],
            act_formats=["none", "mxint8"], block_sizes=[None, 128], block_size_formats=["mx"],
            recipes=["int4-gptq", "mxint4_b64-qat_gptq"])


def test_grid_normalises_its_axes_and_is_frozen():
    grid = SweepGrid("m1,m2", "int4, int8", ["rtn", None], smoothquant=None, block_sizes="32,none")
    assert grid.models == ("m1", "m2") and grid.formats == ("int4", "int8") and grid.methods == ("rtn",)
    assert grid.smoothquant == (None,) and grid.block_sizes == ("32", "none") and grid.recipes == ()
    assert grid == SweepGrid(["m1", "m2"], ("int4", "int8"), ("rtn",), block_sizes=["32", "none"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.models = ("m3",)
    assert dataclasses.replace(grid, formats=("int3",)).formats == ("int3",)


@pytest.mark.parametrize("bad", [dict(models=[], formats=["int4"], methods=["rtn"]),
                                 dict(models=None, formats=["int4"], methods=["rtn"]),
                                 dict(models=["m"], formats=["int4"]),
                                 dict(models=["m"], methods=["rtn"]),
                                 dict(models=["m"])])
def test_grid_needs_a_model_and_a_format_and_method_or_a_recipe(bad):
    with pytest.raises(RecipeError, match="at least one model"):
        SweepGrid(**bad)
    SweepGrid(models=["m"], recipes=["int4-rtn"])  # one explicit recipe is a grid


def test_grid_plans_what_plan_runs_plans():
    models = ["m1", "m2"]
    setting = EvalSetting(128, 16, text="0123456789ab")
    ids, bos = {"m1": "m1@0123456789ab"}, {"m2": True}
    want = plan_runs(models, **AXES, seq_len=128, eval_max_windows=16, eval_text="0123456789ab", model_ids=ids,
                     bos=bos)
    got = SweepGrid(models, **AXES).plan(setting, model_ids=ids, bos=bos)
    assert [s.key for s in got] == [s.key for s in want] and got == want
    assert len(got) == 2 * (2 * 3 * 2 * 2 + 3 * 2 * 2 + 2)  # mxint4 gets two block sizes, int8 one; + 2 recipes
    assert all(s.evaluation.bos == (s.model == "m2") for s in got)
    # the default evaluation is plan_runs' default, and the keyword form of plan_runs takes the same setting
    assert SweepGrid(models, ["int4"], ["rtn"]).plan() == plan_runs(models, ["int4"], ["rtn"])
    assert plan_runs(models, **AXES, evaluation=setting, model_ids=ids, bos=bos) == want
    assert plan_sweep(SweepGrid(models, **AXES), setting, identify=None) == plan_runs(
        models, **AXES, evaluation=setting)
    assert SweepGrid(models, **AXES).model_recipes() == {}  # no named mix in the grid


def test_plan_runs_evaluation_takes_precedence_over_the_loose_arguments():
    setting = EvalSetting(64, 8, bos=True)
    plan = plan_runs(["a", "b"], ["int4"], ["rtn"], seq_len=512, eval_max_windows=2, evaluation=setting,
                     bos={"b": False})
    assert [(s.seq_len, s.eval_max_windows, s.evaluation.bos) for s in plan] == [(64, 8, True), (64, 8, False)]


def test_collect_takes_a_grid_and_keeps_the_keys_of_the_keyword_form(tmp_path):
    grid = SweepGrid(["m1", "m2"], ["mxint4", "int8"], ["rtn", "gptq"], block_sizes=[None, 64])
    kw = collect(["m1", "m2"], ["mxint4", "int8"], ["rtn", "gptq"], block_sizes=[None, 64],
                 store=tmp_path / "kw.sqlite", run_fn=FAKE, identify=None, eval_max_windows=4, progress=False)
    gr = collect(grid, store=tmp_path / "grid.sqlite", run_fn=FAKE, identify=None, eval_max_windows=4,
                 progress=False)
    assert (kw.planned, kw.done) == (gr.planned, gr.done) == (16, 16)
    with RunStore(tmp_path / "kw.sqlite") as a, RunStore(tmp_path / "grid.sqlite") as b:
        assert a.keys() == b.keys() == {s.key for s in grid.plan(EvalSetting(256, 4))}
    with pytest.raises(QuantpredictError, match=r"SweepGrid and grid axes \(formats, block_sizes\)"):
        collect(grid, ["int4"], block_sizes=[32], store=tmp_path / "x.sqlite", run_fn=FAKE, identify=None,
                progress=False)
    with pytest.raises(QuantpredictError, match="at least one model"):
        collect([], ["int4"], ["rtn"], store=tmp_path / "x.sqlite", run_fn=FAKE, identify=None, progress=False)
