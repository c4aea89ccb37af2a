"""Reading run tables: a run store (``quantpredict.runs.RunStore``) or an exported parquet/CSV file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from quantpredict.errors import PredictorError
from quantpredict.runs.store import RunStore


def read_runs(store: str | Path | list | tuple | None = None, runs: str | Path | None = None) -> pd.DataFrame:
    """The run table from ``store`` (a RunStore path or SQLAlchemy URL, or several: one store file per source of
    runs, merged here, each run keeping its own key) or ``runs`` (.parquet or .csv)."""
    if (store is None) == (runs is None):
        raise PredictorError("pass exactly one of --store PATH (a run store) or --runs FILE (.parquet or .csv)")
    if store is not None:
        stores = list(store) if isinstance(store, (list, tuple)) else [store]
        frames = []
        for s in stores:
            if "://" not in str(s) and not Path(s).exists():
                from quantpredict.data import DATA_DIR, data_problem

                problem = data_problem()
                shipped = (f"the shipped runs are in the data folder, but {problem}" if problem
                           else f"the shipped ones are {DATA_DIR / 'runs'}/*.sqlite")
                raise PredictorError(f"run store {s} does not exist; pass an existing store or collect runs first "
                                     f"({shipped})")
            with RunStore(s, create=False) as st:
                frames.append(st.to_frame())
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        if "run_key" in frame and frame["run_key"].duplicated().any():
            frame = frame.drop_duplicates("run_key", keep="last")
        return frame
    path = Path(runs)
    if not path.is_file():
        raise PredictorError(f"runs file {path} does not exist; export one with `quantpredict runs export --store "
                             "PATH --out runs.parquet`")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise PredictorError(f"runs file {path} must end in .parquet or .csv")


def sweep_setting_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The runs measured on at least their model's most common window count (its sweep's), one per recipe (the one
    on the most windows, where a store has a recipe measured twice), and how many others were left out: a rehearsal
    on fewer windows is not a second data point of the same recipe, while a recipe measured on more windows than the
    sweep (to bring its standard error down) stands in for its sweep-sized run. Frames without a ``recipe`` column
    are filtered on the window count alone."""
    setting = runs.groupby("model")["eval_windows"].agg(lambda w: w.mode().iloc[0])
    keep = runs["eval_windows"] >= runs["model"].map(setting)
    if "recipe" in runs:
        most = runs[keep].groupby(["model", "recipe"])["eval_windows"].transform("max")
        keep &= runs["eval_windows"].eq(most.reindex(runs.index))
        # two runs of a recipe on the same count (which keep alike): the first, as the store lists them
        keep &= ~runs[["model", "recipe", "eval_windows"]].duplicated()
    return runs[keep], int((~keep).sum())
