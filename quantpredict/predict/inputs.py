"""Reading run tables: a run store (``quantpredict.runs.RunStore``) or an exported parquet/CSV file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from quantpredict.errors import PredictorError


def read_runs(store: str | Path | None = None, runs: str | Path | None = None) -> pd.DataFrame:
    """The run table from ``store`` (a RunStore path or SQLAlchemy URL) or ``runs`` (.parquet or .csv)."""
    if (store is None) == (runs is None):
        raise PredictorError("pass exactly one of --store PATH (a run store) or --runs FILE (.parquet or .csv)")
    if store is not None:
        try:
            from quantpredict.runs import RunStore
        except ImportError:
            raise PredictorError("the run store (quantpredict.runs) is not available in this version; export the "
                                 "runs to parquet or CSV and pass --runs FILE") from None
        return RunStore(store).to_frame()
    path = Path(runs)
    if not path.is_file():
        raise PredictorError(f"runs file {path} does not exist; export one with `quantpredict runs export --store "
                             "PATH --out runs.parquet`")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise PredictorError(f"runs file {path} must end in .parquet or .csv")
