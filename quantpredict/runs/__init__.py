"""The run store, sweep planning and executors: collect the data the predictors learn from, durably.

- :class:`RunStore`: one row per run (SQLite file or any SQLAlchemy URL), :meth:`RunStore.to_frame` exports
  :data:`PUBLIC_COLUMNS` then one column per feature.
- :func:`plan_runs` / :class:`RunSpec` / :func:`run_key`: the grid and the key of each run; :class:`SweepGrid` holds
  a grid's axes as one value (:meth:`SweepGrid.plan` plans it), :func:`plan_sweep` plans it as :func:`collect` does,
  and :func:`dry_run` says what of that plan a store does not hold yet. How runs are measured is one
  :class:`~quantpredict.recipe.EvalSetting`, from the caller through each :class:`RunSpec` to the evaluation.
- :func:`collect`: run a grid into a store, resumably, locally or on Dask; :func:`execute_run` is the real run,
  :func:`quantpredict.runs.fake.fake_run` a fast stand-in for tests.
"""

from __future__ import annotations

from quantpredict.runs.execute import execute_run
from quantpredict.runs.identity import model_id, weights_hash
from quantpredict.runs.provenance import provenance
from quantpredict.runs.spec import CODE_VERSION, RunSpec, SweepGrid, plan_runs, recipe_label, run_key
from quantpredict.runs.store import EXTRA_COLUMNS, PUBLIC_COLUMNS, SCHEMA_VERSION, RunStore
from quantpredict.runs.sweep import CollectSummary, DryRun, collect, dry_run, plan_sweep, resolve_run_fn, run_one

__all__ = [
    "CODE_VERSION", "EXTRA_COLUMNS", "PUBLIC_COLUMNS", "SCHEMA_VERSION", "CollectSummary", "DryRun", "RunSpec",
    "RunStore", "SweepGrid", "collect", "dry_run", "execute_run", "model_id", "plan_runs", "plan_sweep", "provenance",
    "recipe_label", "resolve_run_fn", "run_key", "run_one", "weights_hash",
]
