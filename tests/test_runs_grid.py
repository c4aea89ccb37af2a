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


def test_run_spec_from_columns_reads_back_its_columns():
    """RunSpec.from_columns is the constructor of stored column values; to_dict gives them back (eval_max_windows is
    the store's name of EvalSetting.max_windows, mapped in that one place)."""
    import warnings

    from quantpredict.recipe import Recipe
    from quantpredict.runs import RunSpec

    spec = RunSpec("m", Recipe("mxint4", block_size=128, method="gptq", smoothquant_alpha=0.5, act_format="mxint8"),
                   EvalSetting(128, 16, bos=True, text="0123456789ab"), model_id="m@abc")
    cols = spec.to_dict()
    assert cols["eval_max_windows"] == 16 and cols["eval_bos"] is True and cols["eval_text"] == "0123456789ab"
    assert RunSpec.from_columns(cols) == spec and RunSpec.from_columns(cols).key == spec.key
    without_label = {k: v for k, v in cols.items() if k not in ("recipe", "recipe_json", "run_key")}
    assert RunSpec.from_columns(without_label) == spec
    assert RunSpec.from_columns(model="m", weight_format="int8").key == "m|int8-rtn|" + spec.code_version + \
        "|seq256-wall"
    with pytest.warns(DeprecationWarning, match="RunSpec"):
        legacy = RunSpec("m", "mxint4", "gptq", block_size=128, smoothquant_alpha=0.5, act_format="mxint8",
                         seq_len=128, eval_max_windows=16, bos=True, eval_text="0123456789ab", model_id="m@abc")
    assert legacy == spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunSpec("m", Recipe("int4"), EvalSetting())  # the recipe form warns of nothing


def test_plan_runs_and_collect_take_a_grid_and_a_setting_and_warn_for_the_loose_form(tmp_path):
    import warnings

    grid = SweepGrid(["m1", "m2"], **AXES)
    setting = EvalSetting(128, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = plan_runs(grid, evaluation=setting)
    with pytest.warns(DeprecationWarning, match="plan_runs"):
        old = plan_runs(["m1", "m2"], **AXES, seq_len=128, eval_max_windows=16)
    assert new == old == grid.plan(setting)
    with pytest.raises(TypeError, match="grid axes"):
        plan_runs(grid, formats=["int4"])
    with pytest.warns(DeprecationWarning, match="collect"):
        collect(["m1"], ["int8"], ["rtn"], store=tmp_path / "a.sqlite", run_fn=FAKE, identify=None,
                eval_max_windows=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect(SweepGrid(["m1"], ["int8"], ["rtn"]), store=tmp_path / "b.sqlite", evaluation=EvalSetting(256, 4),
                run_fn=FAKE, identify=None, progress=False)
    with RunStore(tmp_path / "a.sqlite") as a, RunStore(tmp_path / "b.sqlite") as b:
        assert a.keys() == b.keys()


def test_dry_run_is_collects_plan_less_the_store(tmp_path):
    from quantpredict.runs import dry_run

    grid = SweepGrid(["m1"], ["int8", "int4"], ["rtn"])
    store = tmp_path / "d.sqlite"
    first = dry_run(grid, EvalSetting(256, 4), store=store, identify=None)
    assert not store.exists() and len(first.planned) == len(first.todo) == 2
    collect(SweepGrid(["m1"], ["int8"], ["rtn"]), store=store, evaluation=EvalSetting(256, 4), run_fn=FAKE,
            identify=None, progress=False)
    second = dry_run(grid, EvalSetting(256, 4), store=store, identify=None)
    assert [s.label for s in second.todo] == ["int4-rtn"] and second.skipped == 1
    assert str(second) == f"2 runs planned, 1 already in {store}, 1 to run"


def test_the_eval_text_travels_in_the_setting_hashed_once(tmp_path, monkeypatch):
    """collect with a user's text: the setting carries the file to every run (no eval_text run keyword), and the
    driver hashes the file once (the sha256 prefix in every run key)."""
    from quantpredict import data
    from quantpredict.runs import plan_sweep

    text = tmp_path / "t.txt"
    text.write_text("some evaluation text\n" * 50)
    calls = []
    real = data.read_text_file
    monkeypatch.setattr(data, "read_text_file", lambda p: calls.append(p) or real(p))
    setting = EvalSetting(64, 2).with_text_file(text)
    plan = plan_sweep(SweepGrid(["m1", "m2"], ["int8", "int4"], ["rtn"]), setting, identify=None)
    assert len(calls) == 1 and all(s.evaluation.text_file == str(text) for s in plan)
    assert {s.key.rsplit("|", 1)[1] for s in plan} == {f"seq64-w2-txt{setting.text}"}
