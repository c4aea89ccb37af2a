"""The durable run store: one row per (model, recipe, evaluation setting) run, in SQLite or any SQLAlchemy database.

Every write is its own transaction, committed before the call returns, so a sweep killed at any moment keeps every
run it finished. SQLite files use write-ahead logging and a busy timeout (plus retries) so that a second process
can append while the first is writing; SQL servers (PostgreSQL, ...) handle that themselves.

Features are kept in one JSON column so that adding a feature to the schema needs no migration; :meth:`to_frame`
spreads them into one column each, in the order of :data:`quantpredict.schema.FEATURE_NAMES`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

from quantpredict.errors import StoreError

SCHEMA_VERSION = 1
APP = "quantpredict.runs"
DEFAULT_FILENAME = "runs.sqlite"
META_TABLE = "quantpredict_meta"
RUNS_TABLE = "quantpredict_runs"
STATUSES = ("done", "failed")

#: The public export schema: these columns first, in this order, then one column per feature.
PUBLIC_COLUMNS: tuple[str, ...] = (
    "model", "family", "n_params", "recipe", "weight_format", "block_size", "method", "smoothquant_alpha",
    "act_format", "ppl_fp", "ppl_quant", "nll_fp", "nll_quant", "delta_nll_se", "kld", "top1_agree", "eval_tokens",
    "status",
)
#: Columns exported after the features.
EXTRA_COLUMNS: tuple[str, ...] = (
    "run_key", "model_id", "delta_nll", "seq_len", "eval_max_windows", "eval_windows", "eval_seconds", "seconds",
    "error", "attempts", "code_version", "git_commit", "host", "started_at", "finished_at", "provenance",
)
# stored columns by type; features, timings, provenance and unknown results are JSON text
_STR = ("run_key", "model", "model_id", "family", "recipe", "weight_format", "method", "act_format", "status",
        "code_version", "git_commit", "host", "started_at", "finished_at")
_INT = ("n_params", "block_size", "eval_tokens", "seq_len", "eval_max_windows", "eval_windows", "attempts")
_FLOAT = ("smoothquant_alpha", "ppl_fp", "ppl_quant", "nll_fp", "nll_quant", "delta_nll", "delta_nll_se", "kld",
          "top1_agree", "eval_seconds", "seconds")
_TEXT = ("error",)
_JSON = ("features", "timings", "provenance", "extra")
_RESULT_ALIASES = {"windows": "eval_windows"}  # Comparison.to_dict() names -> store columns


def _schema() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """FEATURE_NAMES and TIMING_NAMES of the torch-free :mod:`quantpredict.schema`."""
    from quantpredict import schema

    return schema.FEATURE_NAMES, schema.TIMING_NAMES


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _tables():
    from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text

    md = MetaData()
    meta = Table(META_TABLE, md, Column("key", String(64), primary_key=True), Column("value", Text))
    cols = [Column("run_key", String(512), primary_key=True)]
    cols += [Column(c, String(256), index=c in ("status", "model")) for c in _STR if c != "run_key"]
    cols += [Column(c, Integer().with_variant(Integer, "sqlite")) for c in _INT]
    cols += [Column(c, Float) for c in _FLOAT]
    cols += [Column(c, Text) for c in _TEXT + _JSON]
    runs = Table(RUNS_TABLE, md, *cols)
    return md, meta, runs


def _check_tables(where: str, tables: set[str], read_meta, *, strict: bool) -> bool:
    """Validate what a database holds; True when it is a run store already, False when empty (to initialise).

    ``strict`` (a SQLite file of its own) also rejects databases holding anything else.
    """
    ours = {META_TABLE, RUNS_TABLE}
    tables = {t for t in tables if not t.startswith("sqlite_")}
    if META_TABLE not in tables:
        if RUNS_TABLE in tables or (strict and tables):
            shown = ", ".join(sorted(tables)[:5])
            raise StoreError(f"{where} is not a quantpredict run store (it holds tables {shown} but no "
                             f"{META_TABLE}); pass a new file name for the store")
        return False
    meta = read_meta()
    if meta.get("app") != APP:
        raise StoreError(f"{where} is not a quantpredict run store ({META_TABLE}.app = {meta.get('app')!r}); "
                         "pass a new file name for the store")
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise StoreError(f"{where}: run store has an unreadable schema version {meta.get('schema_version')!r}; "
                         "the file is corrupt, restore it from a copy") from None
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where} is a run store of schema version {version}, newer than this quantpredict "
                         f"(schema {SCHEMA_VERSION}); upgrade quantpredict to read it")
    if not ours <= tables:
        raise StoreError(f"{where}: run store is missing table {RUNS_TABLE}; the file is corrupt, restore it "
                         "from a copy")
    return True


def _precheck_sqlite_file(path: Path) -> None:
    """Refuse a file that is not a run store without writing a byte to it."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a run store file")
    if path.stat().st_size == 0:
        return  # an empty file is an empty SQLite database: initialise it
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head != b"SQLite format 3\x00":
        raise StoreError(f"{path} is not a quantpredict run store (not an SQLite database); pass a new file name "
                         "or an existing runs.sqlite")
    try:
        con = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open run store {path} read-only: {exc}") from exc
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        _check_tables(str(path), tables, lambda: dict(con.execute(f"SELECT key, value FROM {META_TABLE}")),
                      strict=True)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a readable run store ({exc}); restore it from a copy") from exc
    finally:
        con.close()


def _is_locked(exc: Exception) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _clean(value):
    """JSON/SQL-friendly scalars: numpy and torch scalars to Python, NaN kept for JSON, tensors refused."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cast(col: str, value):
    if value is None:
        return None
    value = _clean(value)
    if col in _INT:
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(value)
    if col in _FLOAT:
        return float(value)
    return str(value)


class RunStore:
    """A run store at a path (SQLite file; a directory gets ``runs.sqlite`` inside) or an SQLAlchemy URL.

    Opening a file that is not a run store, or a store of a newer schema version, raises :class:`StoreError` and
    leaves the file untouched. A new path is created (with its parent directories) unless ``create=False``.
    """

    def __init__(self, url_or_path: str | Path, *, create: bool = True, busy_timeout_s: float = 60.0):
        from sqlalchemy import create_engine, event
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool, StaticPool

        text = str(url_or_path)
        self.path: Path | None = None
        if "://" in text:
            url = make_url(text)
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                self.path = Path(url.database)
        else:
            p = Path(text).expanduser()
            self.path = p / DEFAULT_FILENAME if p.is_dir() else p
            url = make_url("sqlite://").set(database=str(self.path))
        self.url = url.render_as_string(hide_password=True)
        self._sqlite = url.get_backend_name() == "sqlite"
        if self.path is not None:
            _precheck_sqlite_file(self.path)
            if not self.path.exists():
                if not create:
                    raise StoreError(f"run store {self.path} does not exist; run `quantpredict collect` first")
                self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._sqlite:
            memory = self.path is None
            self.engine = create_engine(url, poolclass=StaticPool if memory else NullPool,
                                        connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

            @event.listens_for(self.engine, "connect")
            def _on_connect(dbapi_con, _record):
                # take transaction control from pysqlite so BEGIN IMMEDIATE can be issued for writes
                dbapi_con.isolation_level = None
                dbapi_con.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                if not memory:
                    dbapi_con.execute("PRAGMA journal_mode = WAL")
                dbapi_con.execute("PRAGMA synchronous = FULL")

            @event.listens_for(self.engine, "begin")
            def _on_begin(conn):
                # writers take the lock up front: a deferred read-then-write upgrade fails at once under WAL
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("qp_write") else "BEGIN")
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._md, self._meta, self._runs = _tables()
        self._init()

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def _write(self, fn, *, retries: int = 20):
        """Run ``fn(conn)`` in one write transaction, retrying while another writer holds the database."""
        from sqlalchemy.exc import OperationalError

        delay = 0.05
        for attempt in range(retries + 1):
            try:
                with self.engine.connect().execution_options(qp_write=True) as conn, conn.begin():
                    return fn(conn)
            except OperationalError as exc:
                if not _is_locked(exc) or attempt == retries:
                    raise StoreError(f"cannot write to run store {self.url}: {exc.orig}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _read(self, fn):
        with self.engine.connect() as conn, conn.begin():
            return fn(conn)

    def _init(self) -> None:
        from sqlalchemy import inspect, select

        def check(conn) -> bool:
            tables = set(inspect(conn).get_table_names())

            def read_meta():
                return {k: v for k, v in conn.execute(select(self._meta.c.key, self._meta.c.value))}

            return _check_tables(self.url, tables, read_meta, strict=self.path is not None)

        if self._read(check):  # an existing store: no write lock taken just to open it
            return

        def init(conn):
            if check(conn):  # another process initialised it meanwhile
                return
            self._md.create_all(conn)
            conn.execute(self._meta.insert(), [
                {"key": "app", "value": APP},
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                {"key": "created_at", "value": _now()},
            ])

        self._write(init)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    # ---- metadata ---------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        """The metadata table (app, schema_version, created_at)."""
        from sqlalchemy import select

        return self._read(lambda c: {k: v for k, v in c.execute(select(self._meta.c.key, self._meta.c.value))})

    @property
    def schema_version(self) -> int:
        return int(self.meta()["schema_version"])

    # ---- writing ----------------------------------------------------------------------------------------------

    def _normalise(self, row: Mapping) -> dict:
        row = dict(row)
        features = dict(_clean(row.pop("features", None) or {}))
        timings = dict(_clean(row.pop("timings", None) or {}))
        provenance = _clean(row.pop("provenance", None))
        if isinstance(provenance, str):
            provenance = json.loads(provenance)
        extra = dict(_clean(row.pop("extra", None) or {}))
        FEATURE_NAMES, TIMING_NAMES = _schema()
        out: dict = {}
        for k, v in row.items():
            k = _RESULT_ALIASES.get(k, k)
            if k in _STR or k in _INT or k in _FLOAT or k in _TEXT:  # a column first: block_size is both
                out[k] = _cast(k, v)
            elif k in FEATURE_NAMES or k in TIMING_NAMES:
                features.setdefault(k, _clean(v))
            else:
                extra[k] = _clean(v)
        if not out.get("run_key"):
            raise StoreError("a run row needs a run_key; build it with quantpredict.runs.run_key(...)")
        status = out.get("status")
        if status not in STATUSES:
            raise StoreError(f"run {out['run_key']!r}: status must be one of {STATUSES}, got {status!r}")
        if provenance:
            out.setdefault("git_commit", provenance.get("git_commit"))
            out.setdefault("host", provenance.get("host"))
        out["features"] = json.dumps(features, sort_keys=True)
        out["timings"] = json.dumps(timings, sort_keys=True)
        out["provenance"] = json.dumps(provenance, sort_keys=True) if provenance is not None else None
        out["extra"] = json.dumps(extra, sort_keys=True, default=str)
        return out

    def add(self, row: Mapping, *, overwrite_done: bool = False) -> bool:
        """Insert or replace one run in its own committed transaction; True when written.

        ``row`` holds store columns (``run_key`` and ``status`` required), features either flat (their schema
        names) or as a ``features`` dict, and optionally ``timings``/``provenance`` dicts; any other key is kept
        in the ``extra`` JSON. A ``failed`` row never replaces a ``done`` one (returns False) unless
        ``overwrite_done``; replacing a row counts it in ``attempts``.
        """
        from sqlalchemy import select

        values = self._normalise(row)
        runs = self._runs

        def write(conn):
            old = conn.execute(select(runs.c.status, runs.c.attempts).where(runs.c.run_key == values["run_key"]))
            old = old.first()
            if old is not None:
                if old.status == "done" and values["status"] == "failed" and not overwrite_done:
                    return False
                conn.execute(runs.delete().where(runs.c.run_key == values["run_key"]))
            values.setdefault("attempts", (old.attempts or 1) + 1 if old is not None else 1)
            if values["attempts"] is None:
                values["attempts"] = 1
            conn.execute(runs.insert(), [values])
            return True

        return self._write(write)

    def record(self, spec, outcome: Mapping) -> bool:
        """Store the outcome of running ``spec`` (a :class:`~quantpredict.runs.RunSpec`).

        ``outcome`` is what :func:`quantpredict.runs.sweep.run_one` returns: ``status``, ``error``, ``result``
        (the run function's dict: ``family``, ``n_params``, ``recipe``, ``comparison``, ``features``,
        ``timings``), ``started_at``, ``finished_at``, ``seconds``, ``provenance``.
        """
        result = dict(outcome.get("result") or {})
        row: dict = spec.to_dict()  # the spec's columns (RunSpec.from_columns reads them back)
        comparison = dict(result.pop("comparison", None) or {})
        if "seconds" in comparison:
            comparison["eval_seconds"] = comparison.pop("seconds")
        if "top1_agree" not in comparison and comparison.get("top1_agreement_pct") is not None:
            comparison["top1_agree"] = comparison["top1_agreement_pct"] / 100.0  # a fraction in the store
        row |= comparison
        for name in [k for k, v in result.items() if isinstance(v, Mapping) and k not in ("features", "timings")]:
            nested = result.pop(name)  # e.g. the quantization report: quant_<field> columns
            if name == "recipe_dict":
                row["recipe_json"] = json.dumps(nested, sort_keys=True, default=str)
            else:
                row |= {f"{name}_{k}": v for k, v in nested.items()}
        row |= result  # family, n_params, recipe (the backend's own label), features, timings, anything else
        row |= {k: outcome.get(k) for k in ("status", "error", "started_at", "finished_at", "seconds",
                                               "provenance")}
        return self.add(row)

    def update_features(self, key: str, features: Mapping, *, timings: Mapping | None = None) -> None:
        """Add (or overwrite) feature values of one stored run, leaving every measured column as it is: how a feature
        group that arrives after a sweep reaches its runs without evaluating them again (``quantpredict backfill``).
        Names must be schema features or ``<group>_seconds``."""
        from sqlalchemy import select

        FEATURE_NAMES, TIMING_NAMES = _schema()
        unknown = sorted(set(features) - set(FEATURE_NAMES) - set(TIMING_NAMES))
        if unknown:
            raise StoreError(f"update_features: {unknown} are not schema features of quantpredict.schema")
        runs = self._runs

        def write(conn):
            row = conn.execute(select(runs.c.features, runs.c.timings).where(runs.c.run_key == key)).first()
            if row is None:
                raise StoreError(f"run {key!r} is not in {self.url}")
            merged = json.loads(row.features or "{}") | dict(_clean(dict(features)))
            values = {"features": json.dumps(merged, sort_keys=True)}
            if timings:
                values["timings"] = json.dumps(json.loads(row.timings or "{}") | dict(_clean(dict(timings))),
                                               sort_keys=True)
            conn.execute(runs.update().where(runs.c.run_key == key).values(**values))

        self._write(write)

    def update_extra(self, key: str, values: Mapping) -> None:
        """Add (or overwrite) extra values of one stored run (e.g. a model attribute known only later, such as its
        training tokens); measured columns and features are left as they are."""
        from sqlalchemy import select

        runs = self._runs
        clash = sorted(set(values) & (set(_STR) | set(_INT) | set(_FLOAT) | set(_TEXT) | set(_JSON)))
        if clash:
            raise StoreError(f"update_extra: {clash} are stored columns, not extra values")

        def write(conn):
            row = conn.execute(select(runs.c.extra).where(runs.c.run_key == key)).first()
            if row is None:
                raise StoreError(f"run {key!r} is not in {self.url}")
            merged = json.loads(row.extra or "{}") | dict(_clean(dict(values)))
            conn.execute(runs.update().where(runs.c.run_key == key).values(
                extra=json.dumps(merged, sort_keys=True, default=str)))

        self._write(write)

    def delete(self, keys: Iterable[str]) -> int:
        """Remove runs by key (e.g. to force re-running them); returns how many were removed."""
        keys = list(keys)
        runs = self._runs
        return self._write(lambda c: c.execute(runs.delete().where(runs.c.run_key.in_(keys))).rowcount) if keys \
            else 0

    # ---- reading ----------------------------------------------------------------------------------------------

    def keys(self, status: str | None = None) -> set[str]:
        """Run keys, all or of one status."""
        from sqlalchemy import select

        q = select(self._runs.c.run_key)
        if status is not None:
            q = q.where(self._runs.c.status == status)
        return self._read(lambda c: {r[0] for r in c.execute(q)})

    def done_keys(self) -> set[str]:
        """Keys of the finished runs (what a resumed sweep skips)."""
        return self.keys("done")

    def failed_keys(self) -> set[str]:
        return self.keys("failed")

    def __len__(self) -> int:
        from sqlalchemy import func, select

        return self._read(lambda c: c.execute(select(func.count()).select_from(self._runs)).scalar_one())

    def rows(self, keys: Iterable[str] | None = None) -> list[dict]:
        """Stored rows (all, or those of ``keys``) as dicts with the JSON columns decoded, in the order runs
        finished."""
        from sqlalchemy import select

        q = select(self._runs).order_by(self._runs.c.finished_at, self._runs.c.run_key)
        if keys is not None:
            q = q.where(self._runs.c.run_key.in_(list(keys)))
        out = []
        for r in self._read(lambda c: [dict(x._mapping) for x in c.execute(q)]):
            for k in _JSON:
                r[k] = json.loads(r[k]) if r.get(k) else ({} if k != "provenance" else None)
            out.append(r)
        return out

    def get(self, key: str) -> dict | None:
        """One run by key (JSON columns decoded), or None."""
        found = self.rows([key])
        return found[0] if found else None

    def to_frame(self, status: str | None = None):
        """All runs as a DataFrame: :data:`PUBLIC_COLUMNS`, then one column per feature (schema order, then any
        other name the extractor returned), then :data:`EXTRA_COLUMNS` and any other result keys."""
        import pandas as pd

        FEATURE_NAMES, TIMING_NAMES = _schema()
        rows = self.rows()
        if status is not None:
            rows = [r for r in rows if r["status"] == status]
        # A feature named like a stored column (the format feature ``block_size``) shares that column: the
        # measured value wins, and the stored one moves to ``recipe_<name>`` (``None`` = the format's default).
        shared = [c for c in FEATURE_NAMES if c in PUBLIC_COLUMNS or c in EXTRA_COLUMNS]
        feat_names = [c for c in FEATURE_NAMES + TIMING_NAMES if c not in shared]
        other_feats = sorted({k for r in rows for k in r["features"]} - set(feat_names) - set(shared))
        timing_cols = sorted({k for r in rows for k in r["timings"]})
        extra_cols = sorted({k for r in rows for k in r["extra"]})
        records = []
        for r in rows:
            rec = {c: r.get(c) for c in PUBLIC_COLUMNS + EXTRA_COLUMNS}
            rec |= {k: r["features"].get(k) for k in feat_names + other_feats}
            for c in shared:
                rec[f"recipe_{c}"] = rec[c]
                if r["features"].get(c) is not None:
                    rec[c] = r["features"][c]
            rec |= {k: r["timings"].get(k) for k in timing_cols}
            rec |= {k: r["extra"].get(k) for k in extra_cols}
            for k in extra_cols:  # nested values stay readable (and Parquet-writable) as JSON text
                if isinstance(rec[k], (dict, list)):
                    rec[k] = json.dumps(rec[k], sort_keys=True, default=str)
            rec["provenance"] = json.dumps(r["provenance"], sort_keys=True) if r["provenance"] else None
            records.append(rec)
        tail = [f"recipe_{c}" for c in shared] + list(EXTRA_COLUMNS + tuple(timing_cols) + tuple(extra_cols))
        tail = list(dict.fromkeys(c for c in tail if c not in feat_names + other_feats))
        columns = list(PUBLIC_COLUMNS) + feat_names + other_feats + tail
        df = pd.DataFrame.from_records(records, columns=columns)
        for c in columns:
            if c in _INT or c.removeprefix("recipe_") in _INT:
                df[c] = pd.array([None if _isnan(v) else int(v) for v in df[c].tolist()], dtype="Int64")
            elif c in _FLOAT or c in feat_names or c in other_feats or c in timing_cols:
                df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        return df

    def export(self, out: str | Path, status: str | None = None) -> Path:
        """Write :meth:`to_frame` to ``out`` as Parquet (``.parquet``) or CSV (``.csv``); returns the path."""
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise StoreError(f"cannot export runs to {out}: the file name must end in .parquet or .csv")
        df = self.to_frame(status)
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            df.to_parquet(out, index=False)
        else:
            df.to_csv(out, index=False)
        return out
