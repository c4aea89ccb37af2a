"""The practitioner's baseline at equal cost: measure KLD and delta NLL on a few test windows instead of predicting.

:func:`measure_subsample` quantizes each stored run's recipe again and compares it with the FP model window by window
on ``windows`` test windows spread evenly over the part of the split the run's truth did *not* use (the truth is
the first ``eval_max_windows`` windows), so the subsample and the truth share no window. It keeps, per run, every
window's KLD, delta NLL, top-1 agreement and token count, the seconds the quantization took and the seconds one
window's FP + quantized forward passes took, in a Parquet file next to the store (one file per store, resumable).

:func:`equal_cost` then gives each run the subsample a practitioner could afford with a predictor's seconds: ``k``
windows with ``quantize_seconds + k * window_seconds`` at most the predictor's feature seconds (GPTQ recipes pay
their quantization on both sides), at least one window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quantpredict.errors import PredictorError


def subsample_path(store: str | Path) -> Path:
    p = Path(store)
    return p.with_name(p.stem + "_subsample.parquet")


def measure_subsample(store: str | Path, *, windows: int = 32, models: Sequence[str] | None = None,
                      torch_threads: int | None = None, progress: bool = True, out: str | Path | None = None) -> Path:
    """Measure the held-out window subsample of every done run of ``store`` (of ``models``); returns the file."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from quantpredict import data, evaluate
    from quantpredict import models as zoo
    from quantpredict.evaluate.perplexity import eval_stream
    from quantpredict.evaluate.scoring import pair_sums
    from quantpredict.evaluate.windows import make_windows
    from quantpredict.recipe import Recipe
    from quantpredict.runs import RunStore
    from quantpredict.runs.execute import PROCEDURES, procedure
    from quantpredict.threads import torch_threads as thread_limit  # the parameter shadows the name

    with thread_limit(torch_threads):
        out = Path(out) if out is not None else subsample_path(store)
        done = set(pd.read_parquet(out)["run_key"]) if out.exists() else set()
        with RunStore(store, create=False) as st:
            rows = [r for r in st.rows() if r["status"] == "done" and (models is None or r["model"] in models)
                    and r["run_key"] not in done]
        by_model: dict[str, list[dict]] = {}
        for r in rows:
            by_model.setdefault(r["model"], []).append(r)
        bar = tqdm(total=len(rows), desc="subsample", unit="run", disable=not progress)
        for name, model_rows in by_model.items():
            fp, tok = zoo.load(name)
            stream = eval_stream(tok)
            calib = data.token_stream(tok, "wikitext2", "train")
            seq_len = int(model_rows[0]["seq_len"])
            all_w = make_windows(stream.ids, seq_len, bos_id=stream.bos_id)
            fp_cache = evaluate.FPLogitsCache()
            records = []
            for r in model_rows:
                first = int(r["eval_max_windows"] or all_w.n)
                if all_w.n - first < windows:
                    raise PredictorError(f"{name}: the test split has {all_w.n} windows, too few beyond the {first} "
                                         f"truth windows for a subsample of {windows}; lower windows=")
                pick = np.linspace(first, all_w.n - 1, windows).round().astype(int)
                recipe = Recipe.from_label(r["recipe"])
                q = copy.deepcopy(fp)
                t = time.perf_counter()
                PROCEDURES[procedure(recipe)](q, recipe, calib, batch_size=8, progress=False)
                quantize_seconds = time.perf_counter() - t
                t = time.perf_counter()
                sums = pair_sums(fp, q, all_w[torch.as_tensor(pick)], batch_size=8, progress=False, fp_cache=fp_cache,
                                 fp_key=name)
                window_seconds = (time.perf_counter() - t) / windows
                counts = all_w.scored_counts[torch.as_tensor(pick)].double()
                records.append({
                    "run_key": r["run_key"], "model": name, "recipe": r["recipe"], "windows": json.dumps(pick.tolist()),
                    "window_kld": json.dumps((sums["kld"] / counts).tolist()),
                    "window_delta_nll": json.dumps((sums["delta_nll"] / counts).tolist()),
                    "window_top1": json.dumps((sums["top1"] / counts).tolist()),
                    "window_tokens": json.dumps(counts.long().tolist()),
                    "quantize_seconds": quantize_seconds, "window_seconds": window_seconds})
                del q
                bar.update(1)
            frame = pd.DataFrame(records)
            if out.exists():
                frame = pd.concat([pd.read_parquet(out), frame], ignore_index=True)
            tmp = out.with_suffix(".tmp.parquet")
            frame.to_parquet(tmp, index=False)
            tmp.replace(out)  # a kill mid-write keeps the previous file
        bar.close()
        return out


def equal_cost(sub: pd.DataFrame, predictor_seconds: pd.Series, *, fp_shared: bool = True) -> pd.DataFrame:
    """Per run, the subsample a predictor's seconds buy: ``k`` windows and their token-weighted KLD, delta NLL and
    top-1. ``predictor_seconds`` is indexed by run key. With ``fp_shared`` the FP side of a window is counted as
    already paid (a sweep of one model's recipes keeps it), i.e. a window costs half of ``window_seconds``."""
    rows = []
    for _, r in sub.iterrows():
        if r["run_key"] not in predictor_seconds.index:
            continue
        w = r["window_seconds"] / (2 if fp_shared else 1)
        k = int(np.clip(np.floor((predictor_seconds[r["run_key"]] - r["quantize_seconds"]) / w), 1, None))
        rows.append({"run_key": r["run_key"], "k": k, **subsample_estimate(r, k)})
    return pd.DataFrame(rows).set_index("run_key") if rows else pd.DataFrame()


def subsample_estimate(row: pd.Series, k: int) -> dict[str, float]:
    """The estimate from the first ``k`` of a run's spread windows (they are evenly spaced, so any prefix of the
    list is not: take every ``n/k``-th instead)."""
    kld = np.asarray(json.loads(row["window_kld"]))
    delta = np.asarray(json.loads(row["window_delta_nll"]))
    top1 = np.asarray(json.loads(row["window_top1"]))
    tok = np.asarray(json.loads(row["window_tokens"]), float)
    k = int(min(max(k, 1), len(kld)))
    idx = np.linspace(0, len(kld) - 1, k).round().astype(int)
    w = tok[idx] / tok[idx].sum()
    return {"kld": float((kld[idx] * w).sum()), "delta_nll": float((delta[idx] * w).sum()),
            "top1": float((top1[idx] * w).sum())}


def subsample_curve(sub: pd.DataFrame, truth: pd.DataFrame, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> pd.DataFrame:
    """Median relative KLD error and median absolute top-1 error of a ``k``-window subsample, for each ``k``, against
    ``truth`` (indexed by run key, columns ``kld``, ``top1_agree``), with the seconds it costs per recipe."""
    rows = []
    for k in ks:
        est = pd.DataFrame({r["run_key"]: subsample_estimate(r, k) for _, r in sub.iterrows()}).T
        t = truth.loc[truth.index.intersection(est.index)]
        e = est.loc[t.index]
        sec = (sub.set_index("run_key").loc[t.index, "quantize_seconds"]
               + k * sub.set_index("run_key").loc[t.index, "window_seconds"] / 2)
        rows.append({"k": k, "n_runs": len(t), "kld_median_rel_err": float(np.median(np.abs(e["kld"] / t["kld"] - 1))),
                     "top1_median_abs_err_pp": float(100 * np.median(np.abs(e["top1"] - t["top1_agree"]))),
                     "median_seconds": float(np.median(sec))})
    return pd.DataFrame(rows)
