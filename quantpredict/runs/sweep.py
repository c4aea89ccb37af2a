"""Sweeps: plan the grid, skip what the store holds, run the rest locally or on a Dask cluster, record each run.

Only the driver process (the one calling :func:`collect`) writes to the store; workers compute and send back plain
dicts. So a SQLite store works with any cluster, and each finished run is committed the moment it arrives: a sweep
killed with SIGKILL loses at most the runs in flight, and running the same command again resumes it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpredict.errors import QuantpredictError
from quantpredict.recipe import EvalSetting
from quantpredict.runs.identity import model_id as _model_id
from quantpredict.runs.identity import model_uses_bos
from quantpredict.runs.provenance import provenance
from quantpredict.runs.spec import RunSpec, SweepGrid
from quantpredict.runs.store import RunStore, _clean

DEFAULT_RUN_FN = "quantpredict.runs.execute:execute_run"
EXECUTORS = ("local", "dask")

RunFn = Callable[..., Mapping]


def resolve_run_fn(run_fn: str | RunFn | None) -> RunFn:
    """A run function from a callable or an importable path (``pkg.module:func`` or ``pkg.module.func``).

    ``None`` is the real :func:`quantpredict.runs.execute.execute_run`. Paths travel to Dask workers and
    subprocesses by name, so they work wherever the package is installed.
    """
    if run_fn is None:
        run_fn = DEFAULT_RUN_FN
    if callable(run_fn):
        return run_fn
    text = str(run_fn)
    module, sep, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not module or not attr:
        raise QuantpredictError(f"run function {text!r} is not an importable path; write it as package.module:func")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise QuantpredictError(f"cannot import run function {text!r}: {exc}") from exc
    if not callable(fn):
        raise QuantpredictError(f"run function {text!r} is not callable")
    return fn


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _error_text(exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return f"{type(exc).__name__}: {exc}\n{tb}"[:8000]


def run_one(spec: RunSpec, run_fn: str | RunFn | None = None, run_kwargs: Mapping | None = None) -> dict:
    """Run one spec and return its outcome as a plain, picklable dict; never raises for a failing run.

    Keys: ``key``, ``status`` (``done``/``failed``), ``error`` (type, message and traceback tail), ``result``
    (the run function's dict), ``started_at``/``finished_at`` (UTC ISO), ``seconds``, ``provenance``.
    This is what workers execute; the driver records the outcome.
    """
    started, t0 = _now(), time.perf_counter()
    result, error = None, None
    try:
        fn = resolve_run_fn(run_fn)
        result = fn(spec, **dict(run_kwargs or {}))
        if not isinstance(result, Mapping):
            raise TypeError(f"run function returned {type(result).__name__}, expected a dict")
        result = _clean(dict(result))
    except Exception as exc:  # a failing run is data (recorded as failed), not the end of the sweep
        result, error = None, _error_text(exc)
    return {
        "key": spec.key, "status": "done" if error is None else "failed", "error": error, "result": result,
        "started_at": started, "finished_at": _now(), "seconds": time.perf_counter() - t0,
        "provenance": provenance() | {"pid": os.getpid()},
    }


def _lost(spec: RunSpec, why: str) -> dict:
    """The outcome of a run whose worker died (killed, out of memory) before it could report."""
    return {"key": spec.key, "status": "failed", "error": why, "result": None, "started_at": None,
            "finished_at": _now(), "seconds": None, "provenance": provenance()}


# ---- executors: each yields (spec, outcome) as runs finish ---------------------------------------------------------

def _run_serial(specs, run_fn, run_kwargs) -> Iterator[tuple[RunSpec, dict]]:
    for spec in specs:
        yield spec, run_one(spec, run_fn, run_kwargs)


def _run_pool(specs, run_fn, run_kwargs, workers: int) -> Iterator[tuple[RunSpec, dict]]:
    """A pool of ``workers`` fresh (spawned) processes, at most ``workers`` runs in flight."""
    pending = list(reversed(specs))
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    in_flight: dict = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                spec = pending.pop()
                in_flight[pool.submit(run_one, spec, run_fn, run_kwargs)] = spec
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                spec = in_flight.pop(fut)
                try:
                    yield spec, fut.result()
                except BrokenProcessPool:
                    broken = True
                    yield spec, _lost(spec, "worker process died (killed or out of memory) during this run")
            if broken:  # the pool is unusable: count the other in-flight runs as lost too, start a new pool
                for spec in in_flight.values():
                    yield spec, _lost(spec, "worker pool broke (another run's process died) during this run")
                in_flight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_dask(specs, run_fn, run_kwargs, workers: int, scheduler, cluster_kwargs) -> Iterator[tuple[RunSpec, dict]]:
    """Submit every run to a Dask cluster and yield outcomes as they complete.

    ``scheduler`` is an address (``tcp://host:8786``), a ``distributed.Client`` or a cluster object (e.g.
    ``dask_jobqueue.SLURMCluster``); ``None`` starts a ``LocalCluster`` of ``workers`` single-threaded processes.
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - dask[distributed] is a dependency
        raise QuantpredictError("executor 'dask' needs dask[distributed]: pip install 'dask[distributed]'") from exc
    cluster = client = None
    own_client = True
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, **dict(cluster_kwargs or {}))
            client = Client(cluster)
        elif isinstance(scheduler, Client):
            client, own_client = scheduler, False
        else:
            try:
                client = Client(scheduler, timeout="60s")
            except OSError as exc:
                raise QuantpredictError(f"cannot reach Dask scheduler {scheduler!r}: {exc}; check the address "
                                        "(tcp://HOST:8786) and that the scheduler is running") from exc
        futures = {}
        for spec in specs:
            fut = client.submit(run_one, spec, run_fn, run_kwargs, pure=False)
            futures[fut] = spec
        for fut in as_completed(list(futures)):
            spec = futures[fut]
            try:
                outcome = fut.result()
            except Exception as exc:  # KilledWorker, a lost worker, a serialisation error: the run is failed
                outcome = _lost(spec, f"dask task failed: {_error_text(exc)}")
            fut.release()
            yield spec, outcome
    finally:
        if client is not None and own_client:
            client.close()
        if cluster is not None:
            cluster.close()


# ---- the sweep -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectSummary:
    """What a :func:`collect` call did. ``skipped`` were already done in the store before it started."""

    planned: int
    skipped: int
    done: int
    failed: int
    seconds: float
    store: str
    executor: str
    failed_keys: tuple[str, ...] = field(default=())

    @property
    def ran(self) -> int:
        return self.done + self.failed

    def __str__(self) -> str:
        s = (f"{self.planned} runs planned: {self.skipped} already done, {self.done} done now, {self.failed} failed "
             f"({self.seconds:.1f} s, executor {self.executor}) -> {self.store}")
        if self.failed:
            s += "\nfailed runs are retried by the next collect (pass retry_failed=False / --no-retry-failed to skip)"
        return s


def collect(grid: SweepGrid | Sequence[str] | None = None, *axes: Sequence[str], store: RunStore | str | Path,
            evaluation: EvalSetting | None = None, run_fn: str | RunFn | None = None,
            run_kwargs: Mapping | None = None, executor: str = "local", workers: int = 1, scheduler=None,
            cluster_kwargs: Mapping | None = None, identify: Callable[[str], str] | None = _model_id,
            retry_failed: bool = True, progress: bool = True, calib_text: str | Path | None = None,
            **legacy: Any) -> CollectSummary:
    """Run ``grid`` (a :class:`~quantpredict.runs.SweepGrid`) into ``store``, each run evaluated as ``evaluation``
    (an :class:`~quantpredict.recipe.EvalSetting`; default ``EvalSetting()``: 256-token windows, the whole test
    split) says.

    Finished run keys are skipped (so calling it again resumes a killed sweep); ``failed`` runs are run again
    unless ``retry_failed=False``. Each outcome is committed as soon as it arrives. A run that raises is recorded
    as ``failed`` with its error text and the sweep goes on. :func:`dry_run` lists what this would run.

    ``executor="local"`` runs in this process (``workers=1``) or in a pool of ``workers`` spawned processes;
    ``executor="dask"`` submits to ``scheduler`` (an address such as ``tcp://host:8786``, a ``Client``, or a
    cluster such as ``dask_jobqueue.SLURMCluster``) or, without one, to a ``LocalCluster`` of ``workers``
    processes. ``run_fn`` (callable or ``"pkg.module:func"``) is called as ``run_fn(spec, **run_kwargs)``; the
    default measures for real (:func:`quantpredict.runs.execute.execute_run`; with several workers on this
    machine each run gets ``torch_threads = cores // workers`` unless ``run_kwargs`` says otherwise).
    ``run_kwargs`` are not part of the run key: use another store for other feature options.
    ``identify`` maps a model to its id with the weights hash (``None`` keys runs by the name alone).
    ``evaluation.max_windows`` limits evaluation to a fixed prefix of the test split (``None``: all of it); the
    setting is part of the run key. A user's evaluation text is a setting too:
    ``EvalSetting(...).with_text_file(path)`` (its sha256 prefix enters the run key, and each run reads the file
    the setting names). Each identified model's tokenizer is probed for its protocol (BOS or not,
    :func:`quantpredict.data.eval_protocol`), which is part of its run keys. ``calib_text``: a user's UTF-8 text
    file to calibrate on (not part of the run key).

    More than ten parameters, on purpose: what runs is one value (``grid``) and how it is measured another
    (``evaluation``); the keyword-only options left are independent of them and of each other (where the results
    go, the run function and its options, the executor and its workers, scheduler and cluster options, model
    identification, retrying, progress, the calibration text).

    Deprecated form (a ``DeprecationWarning``, planned and run exactly as before): the grid's axes as loose
    arguments, ``collect(models, formats, methods, smoothquant=..., block_sizes=..., recipes=..., ...)``, and the
    evaluation as ``seq_len=`` / ``eval_max_windows=`` / ``eval_text=`` (a file path).
    """
    grid, evaluation = _legacy_collect(grid, axes, legacy, evaluation)
    _check_executor(executor, workers, scheduler)
    t0 = time.perf_counter()
    if calib_text is not None:
        from quantpredict.data import read_text_file

        read_text_file(calib_text)  # a clear error now rather than in every run
    plan = plan_sweep(grid, evaluation, identify=identify)
    run_kwargs = _run_kwargs(run_fn, run_kwargs, workers, scheduler, calib_text=calib_text)
    own_store = not isinstance(store, RunStore)
    st = RunStore(store) if own_store else store
    try:
        return _run_plan(plan, st, run_fn, run_kwargs, executor=executor, workers=int(workers), scheduler=scheduler,
                         cluster_kwargs=cluster_kwargs, retry_failed=retry_failed, progress=progress, t0=t0)
    finally:
        if own_store:
            st.close()


def _legacy_collect(grid, axes, legacy: dict, evaluation: EvalSetting | None) -> tuple[SweepGrid, EvalSetting]:
    """:func:`collect`'s grid and setting, mapping its deprecated loose arguments (with a ``DeprecationWarning``)."""
    import warnings

    if "models" in legacy and grid is None:
        grid = legacy.pop("models")
    unknown = [k for k in legacy if k not in (*_GRID_DEFAULTS, "seq_len", "eval_max_windows", "eval_text")]
    if unknown:
        raise TypeError(f"collect() got an unexpected keyword argument {unknown[0]!r}")
    if len(axes) > 2:
        raise TypeError(f"collect() takes at most 3 positional arguments ({1 + len(axes)} given)")
    columns = {k: legacy.pop(k) for k in ("seq_len", "eval_max_windows", "eval_text") if k in legacy}
    if axes or legacy or not isinstance(grid, SweepGrid):
        if isinstance(grid, SweepGrid):
            given = [k for k, v in {**dict(zip(("formats", "methods"), axes)), **legacy}.items()
                     if not (v is _GRID_DEFAULTS[k] or v == _GRID_DEFAULTS[k])]
            if given:
                raise QuantpredictError(f"collect got a SweepGrid and grid axes ({', '.join(given)}); put them in "
                                        "the grid (dataclasses.replace(grid, ...))")
        else:
            if grid is None:
                raise TypeError("collect() needs a SweepGrid (or, deprecated, the models)")
            warnings.warn("collect(models, formats, methods, ...) is deprecated; pass a SweepGrid: "
                          "collect(SweepGrid(models, formats, methods, ...), store=...)", DeprecationWarning,
                          stacklevel=3)
            grid = SweepGrid(grid, *axes, **legacy)
    if columns:
        warnings.warn("collect(seq_len=, eval_max_windows=, eval_text=) is deprecated; pass "
                      "evaluation=EvalSetting(seq_len, max_windows).with_text_file(path)", DeprecationWarning,
                      stacklevel=3)
        if evaluation is None:
            mw = columns.get("eval_max_windows")
            evaluation = EvalSetting(int(columns.get("seq_len", 256)), None if mw is None else int(mw))
        evaluation = evaluation.with_text_file(columns.get("eval_text"))
    return grid, evaluation if evaluation is not None else EvalSetting()


def plan_sweep(grid: SweepGrid, evaluation: EvalSetting | None = None, *,
               identify: Callable[[str], str] | None = _model_id, **legacy: Any) -> list[RunSpec]:
    """The run specs :func:`collect` runs for ``grid`` (before skipping what the store holds), as :func:`dry_run`
    lists them: its named mixes resolved per model, each model identified (``identify``: the weights hash;
    ``None``: by name, and no BOS probe) and probed for its BOS protocol, evaluated as ``evaluation`` (default
    ``EvalSetting()``) says: a user's text comes in it, hashed once by
    :meth:`~quantpredict.recipe.EvalSetting.with_text_file` (``eval_text=PATH`` here is deprecated)."""
    if legacy:
        import warnings

        unknown = sorted(set(legacy) - {"eval_text"})
        if unknown:
            raise TypeError(f"plan_sweep() got an unexpected keyword argument {unknown[0]!r}")
        warnings.warn("plan_sweep(eval_text=PATH) is deprecated; pass EvalSetting(...).with_text_file(PATH)",
                      DeprecationWarning, stacklevel=2)
        evaluation = (evaluation if evaluation is not None else EvalSetting()).with_text_file(legacy["eval_text"])
    model_recipes = grid.model_recipes()
    models = list(grid.models)
    ids = {m: (identify(m) if identify is not None else m) for m in models}
    bos = {m: model_uses_bos(m) for m in models} if identify is not None else {}
    return grid.plan(evaluation if evaluation is not None else EvalSetting(), model_ids=ids, bos=bos,
                     model_recipes=model_recipes)


@dataclass(frozen=True)
class DryRun:
    """What :func:`collect` would do: every run it plans (``planned``), and those the store does not hold yet
    (``todo``, in plan order)."""

    planned: tuple[RunSpec, ...]
    todo: tuple[RunSpec, ...]
    store: str

    @property
    def skipped(self) -> int:
        return len(self.planned) - len(self.todo)

    def __str__(self) -> str:
        return (f"{len(self.planned)} runs planned, {self.skipped} already in {self.store}, {len(self.todo)} to run")


def dry_run(grid: SweepGrid, evaluation: EvalSetting | None = None, *, store: RunStore | str | Path,
            identify: Callable[[str], str] | None = _model_id, retry_failed: bool = True) -> DryRun:
    """The plan of :func:`collect` with these arguments, and what of it the store does not hold yet: the same
    planning (:func:`plan_sweep`) and the same skipping, nothing run. A store that does not exist is not created
    (everything is to run)."""
    plan = plan_sweep(grid, evaluation, identify=identify)
    skip: set[str] = set()
    if isinstance(store, RunStore):
        skip = _skip_keys(store, retry_failed)
    elif "://" in str(store) or Path(store).exists():
        with RunStore(store, create=False) as st:
            skip = _skip_keys(st, retry_failed)
    return DryRun(tuple(plan), tuple(s for s in plan if s.key not in skip),
                  store.url if isinstance(store, RunStore) else str(store))


def _skip_keys(st: RunStore, retry_failed: bool) -> set[str]:
    """The keys a sweep skips: done runs, or every recorded run without ``retry_failed``."""
    return st.done_keys() if retry_failed else st.keys()


def _check_executor(executor: str, workers: int, scheduler) -> None:
    """A known executor, at least one worker, and a scheduler only for Dask."""
    if executor not in EXECUTORS:
        raise QuantpredictError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if int(workers) < 1:
        raise QuantpredictError(f"workers must be at least 1, got {workers}")
    if scheduler is not None and executor != "dask":
        raise QuantpredictError("a scheduler address needs executor='dask' (--executor dask)")


_GRID_DEFAULTS = {"formats": (), "methods": (), "smoothquant": (None,), "act_formats": (None,),
                  "block_sizes": (None,), "block_size_formats": None, "recipes": ()}


def _run_kwargs(run_fn, run_kwargs: Mapping | None, workers: int, scheduler, *, calib_text) -> Mapping | None:
    """``run_kwargs`` plus what the runs need to know: the user's calibration text (the evaluation text travels in
    each spec's setting), and a share of this machine's cores when several workers run the default run function
    here. A bad ``run_fn`` path fails here, before the sweep."""
    if calib_text is not None:
        run_kwargs = dict(run_kwargs or {}) | {"calib_text": str(calib_text)}
    if run_fn is not None and not callable(run_fn):
        resolve_run_fn(run_fn)  # fail before the sweep starts for a bad path
    if run_fn is None and int(workers) > 1 and scheduler is None and "torch_threads" not in (run_kwargs or {}):
        # several runs share this machine: split its cores instead of every run using all of them
        run_kwargs = dict(run_kwargs or {}) | {"torch_threads": max(1, (os.cpu_count() or 1) // int(workers))}
    return run_kwargs


def _run_plan(plan: list[RunSpec], st: RunStore, run_fn, run_kwargs, *, executor: str, workers: int, scheduler,
              cluster_kwargs, retry_failed: bool, progress: bool, t0: float) -> CollectSummary:
    """Skip what ``st`` holds (done runs, or every recorded run without ``retry_failed``), run the rest on the
    executor and record each outcome as it arrives; a progress bar counts them and names each failure."""
    from tqdm.auto import tqdm

    skip = _skip_keys(st, retry_failed)
    todo = [s for s in plan if s.key not in skip]
    skipped = len(plan) - len(todo)
    done = failed = 0
    failed_keys: list[str] = []
    if executor == "dask":
        outcomes = _run_dask(todo, run_fn, run_kwargs, workers, scheduler, cluster_kwargs)
    elif workers > 1 and len(todo) > 1:
        outcomes = _run_pool(todo, run_fn, run_kwargs, workers)
    else:
        outcomes = _run_serial(todo, run_fn, run_kwargs)
    with tqdm(total=len(plan), initial=skipped, desc="collect", unit="run", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        if todo:
            for spec, outcome in outcomes:
                st.record(spec, outcome)
                if outcome["status"] == "done":
                    done += 1
                else:
                    failed += 1
                    failed_keys.append(spec.key)
                    first = (outcome.get("error") or "").splitlines()[:1]
                    bar.write(f"failed: {spec.key}: {first[0] if first else ''}", file=sys.stderr)
                bar.set_postfix(done=done, failed=failed, refresh=False)
                bar.update(1)
    return CollectSummary(planned=len(plan), skipped=skipped, done=done, failed=failed,
                          seconds=time.perf_counter() - t0, store=st.url, executor=executor,
                          failed_keys=tuple(failed_keys))
