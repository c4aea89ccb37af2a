"""Backfill: add feature groups that arrived after a sweep to its stored runs, without evaluating them again.

The evaluation is the expensive part of a run; features are cheap and keep growing (the ``fisher`` and ``profile``
groups came after the shipped sweep). :func:`backfill` loads each model once, measures its sensitivity profile once
(when the ``profile`` group is asked for), computes the missing groups for every done run of that model with the
same calibration windows a sweep uses, and writes them into the run's row. Measured columns are never touched; a
run that already has every feature of the groups is skipped, so a killed backfill resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from quantpredict.errors import QuantpredictError
from quantpredict.recipe import Recipe
from quantpredict.runs.store import RunStore

#: ``pricer(model name)`` gives that model's ``price(recipe) -> {feature: value}``: another path to a group's features
#: (the CLI passes the weights-only pricing ``rank`` uses for the ``profile`` group, whose lean profile fits a 1.5B
#: model where the K-FAC one does not)
Pricer = Callable[[str], Callable[[Recipe], dict[str, float]]]
#: the ``profile`` group's K-FAC terms, which a lean (token-wise) profile does not measure: a pricer leaves them out
KFAC_ONLY = frozenset({"kfac_quad", "kfac_quad_diag"})


@dataclass(frozen=True)
class BackfillSummary:
    runs: int
    filled: int
    skipped: int
    failed: int
    left: int
    models: int
    seconds: float
    store: str
    errors: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = (f"{self.runs} done runs: {self.filled} backfilled, {self.skipped} already had the features, {self.failed} "
             f"failed, {self.left} left for the next call ({self.models} models, {self.seconds:.1f} s) -> "
             f"{self.store}")
        return s + "".join(f"\n  failed: {e}" for e in self.errors[:10])


def _missing(row: dict, names: set[str]) -> bool:
    have = row.get("features") or {}
    return any(have.get(n) is None for n in names)


def backfill(store: str | Path | RunStore, groups: Sequence[str], *, models: Sequence[str] | None = None,
             methods: Sequence[str] | None = None, torch_threads: int | None = None, progress: bool = True,
             limit: int | None = None, on_run: Callable[[str], None] | None = None,
             pricer: Pricer | None = None, recompute: Callable[[dict], bool] | None = None) -> BackfillSummary:
    """Compute feature ``groups`` for every done run of ``store`` (of ``models`` and ``methods``, if given) that
    lacks them. A run is quantized again to be measured, so GPTQ runs cost their GPTQ pass: ``methods=["rtn"]``
    backfills the cheap runs first.

    Each model is loaded once (float32, eager attention) and, for the ``profile`` group, profiled once on the
    sweep's calibration windows; ``features.extract(model, recipe, calib, which=groups, profile=...)`` then gives
    each run's values, written with :meth:`RunStore.update_features`. ``torch_threads`` caps intra-op threads.
    ``limit`` stops after that many runs (a rehearsal). ``pricer`` (:data:`Pricer`): compute the groups through it
    instead (no model is loaded here; the K-FAC terms, :data:`KFAC_ONLY`, are neither computed nor required), writing
    only the features a run does not have yet. ``recompute`` (with ``pricer``): the runs (their store rows) whose
    features of the groups are computed and written again although they have them (a price whose definition
    changed). Returns a :class:`BackfillSummary`.
    """
    from tqdm.auto import tqdm

    from quantpredict import data, features
    from quantpredict import models as zoo
    from quantpredict.features.context import ExtractOptions, parse_which
    from quantpredict.features.extract import feature_windows
    from quantpredict.features.fisher import measure_profile
    from quantpredict.schema import FEATURES
    from quantpredict.threads import torch_threads as thread_limit

    groups = parse_which(list(groups))
    names = {f.name for f in FEATURES if f.group in groups} - (KFAC_ONLY if pricer is not None else set())
    t0 = time.perf_counter()
    own = not isinstance(store, RunStore)
    st = RunStore(store, create=False) if own else store
    with thread_limit(torch_threads):
        try:
            rows = [r for r in st.rows() if r["status"] == "done" and (models is None or r["model"] in models)
                    and (methods is None or r.get("method") in methods)]
            def again(run: dict) -> bool:  # computed again although the run has the features
                return pricer is not None and recompute is not None and recompute(run)

            missing = [r for r in rows if _missing(r, names) or again(r)]
            todo = missing if limit is None else missing[: int(limit)]
            by_model: dict[str, list[dict]] = {}
            for r in todo:
                by_model.setdefault(r["model"], []).append(r)
            filled = failed = 0
            errors: list[str] = []
            bar = tqdm(total=len(todo), desc=f"backfill {','.join(groups)}", unit="run", disable=not progress)
            for name, model_rows in by_model.items():
                if pricer is not None:
                    filled, failed = _priced(st, pricer(name), model_rows, filled, failed, errors, on_run, bar,
                                             again)
                    continue
                model, tok = zoo.load(name, attn_implementation="eager")
                calib = data.token_stream(tok, "wikitext2", "train")
                profile = None
                if "profile" in groups:
                    opts = ExtractOptions()
                    windows = feature_windows(model, calib, opts.n_windows, opts.seq_len, 0)
                    profile = measure_profile(model, windows)
                def extract(recipe: Recipe, model=model, calib=calib, profile=profile) -> dict[str, float]:
                    out = features.extract(model, recipe, calib, which=groups, profile=profile)
                    if profile is not None:
                        out["profile_seconds"] = out.get("profile_seconds", 0.0)
                    return out

                filled, failed = _priced(st, extract, model_rows, filled, failed, errors, on_run, bar,
                                         lambda _run: True)  # measured afresh: every value written
                if profile is not None:
                    bar.write(f"{name}: profile measured in {profile.seconds:.1f} s")
                del model
            bar.close()
            return BackfillSummary(runs=len(rows), filled=filled, skipped=len(rows) - len(missing), failed=failed,
                                   left=len(missing) - len(todo),
                                   models=len(by_model), seconds=time.perf_counter() - t0, store=st.url,
                                   errors=tuple(errors))
        finally:
            if own:
                st.close()


def _priced(st: RunStore, price: Callable[[Recipe], dict[str, float]], rows: Sequence[dict], filled: int,
            failed: int, errors: list[str], on_run: Callable[[str], None] | None, bar,
            again: Callable[[dict], bool]) -> tuple[int, int]:
    """Backfill ``rows`` through ``price`` (a recipe's features); a feature a run already has is kept as it was
    measured, unless ``again(run)`` asks for it to be computed again. Returns the updated (filled, failed)."""
    for r in rows:
        try:
            t = time.perf_counter()
            have = {} if again(r) else (r.get("features") or {})
            out = {k: v for k, v in price(Recipe.from_label(r["recipe"])).items() if have.get(k) is None}
            st.update_features(r["run_key"], out, timings={"backfill_seconds": time.perf_counter() - t})
            filled += 1
        except QuantpredictError as exc:
            failed += 1
            errors.append(f"{r['run_key']}: {exc}")
        if on_run is not None:
            on_run(r["run_key"])
        bar.update(1)
    return filled, failed


def backfill_attributes(store: str | Path | RunStore) -> int:
    """Add the recipe-independent model attributes a run did not record (its model's training tokens, where the
    model's card knows them) to every run of ``store``; returns how many runs gained them."""
    from quantpredict.runs.execute import training_tokens

    own = not isinstance(store, RunStore)
    st = RunStore(store, create=False) if own else store
    try:
        cache: dict[str, dict] = {}
        n = 0
        for r in st.rows():
            if (r.get("extra") or {}).get("tokens_per_param") is not None:
                continue
            attrs = cache.setdefault(r["model"], training_tokens(r["model"]))
            if attrs:
                st.update_extra(r["run_key"], attrs)
                n += 1
        return n
    finally:
        if own:
            st.close()
