"""Long parameter lists: the public functions issue #32 named take at most ten parameters, or say in their
docstring why not (the options left are independent)."""

from __future__ import annotations

import importlib
import inspect

import pytest

NAMED = ["quantpredict.runs.sweep:collect", "quantpredict.qat.finetune:finetune", "quantpredict.runs.spec:plan_runs",
         "quantpredict.evaluate.compare:compare", "quantpredict.evaluate.compare:compare_ids",
         "quantpredict.evaluate.perplexity:perplexity", "quantpredict.predict.allocate:allocate",
         "quantpredict.attention.bench:bench_decode", "quantpredict.runs.sweep:dry_run",
         "quantpredict.runs.sweep:plan_sweep"]


@pytest.mark.parametrize("path", NAMED)
def test_at_most_ten_parameters_or_a_stated_reason(path):
    module, name = path.split(":")
    fn = getattr(importlib.import_module(module), name)
    n = len(inspect.signature(fn).parameters)
    assert n <= 10 or "on purpose" in (fn.__doc__ or ""), f"{path} takes {n} parameters and states no reason"


def test_evaluate_compare_takes_the_setting_a_run_spec_carries():
    from quantpredict.evaluate import EvalSetting, compare
    from quantpredict.runs.spec import RunSpec

    assert "evaluation" in inspect.signature(compare).parameters
    assert inspect.signature(RunSpec).parameters["evaluation"].annotation in ("EvalSetting | None", EvalSetting)
