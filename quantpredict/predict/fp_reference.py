"""The FP reference every printed perplexity rests on, and the one cost model of a full evaluation.

A quantized perplexity is ``ppl_fp * exp(delta NLL)``: the predictors predict ``delta NLL``; ``ppl_fp`` must be the
model's own *measured* FP perplexity, or every perplexity printed inherits the FP predictor's error (SmolLM2-135M:
predicted 51.0, measured 34.8). :func:`resolve_fp_reference` is the one place ``predict``, ``rank``, ``allocate``,
``demo`` and the Python API (:func:`~quantpredict.predict.quality.predict_quality`,
:func:`~quantpredict.predict.rank.rank_recipes`, :func:`~quantpredict.predict.allocate.allocate`) get it from, in
this order:

1. ``ppl_fp`` given (``--ppl-fp X``): a number (finite, at least 1: ``ppl = exp(NLL)`` and ``NLL >= 0``), SE not
   known; or ``"predicted"`` (``--ppl-fp predicted``): predicted by the predictor from the calibration NLL, with its
   interval, and labelled "predicted" wherever it appears;
2. the zoo card (``data/zoo/<model>/zoo_card.json``): ``test_ppl`` and ``test_nll_se`` on the full WikiText-2 test
   split in 256-token windows (``n/a`` SE when a card lacks ``test_nll_se``);
3. a measurement cached per model, ``$QUANTPREDICT_HOME/profiles/fp/<model>-<key>.json`` (beside the profile cache,
   :func:`quantpredict.predict.profile_cache.profiles_root`), keyed by the weights' sha256
   (:func:`~quantpredict.predict.profile_cache.weights_id`), the tokenizer's content, the test text's sha256 and
   the :class:`~quantpredict.recipe.EvalSetting` (``seq256-w64[-bos]``);
4. otherwise it is measured once, on the evaluation protocol (WikiText-2 test, non-overlapping 256-token windows,
   the model's BOS protocol, :func:`quantpredict.data.eval_protocol`), on the first :data:`DEFAULT_FP_WINDOWS`
   windows (``--fp-windows N``), and cached. 64 windows are about 16k predicted tokens: on SmolLM2-135M a standard
   error of 0.05 nats (5% of the perplexity, 33.94 ± 1.67 against 34.79 on 128 windows), smaller than the predicted
   delta's interval it is combined with, for about a minute of forward passes on one loaded CPU core.

The interval printed around a quantized perplexity carries the FP reference's uncertainty as well: in log space,
``log ppl = log ppl_fp + delta``, the predicted delta's interval half-widths ``(delta - lo, hi - delta)`` and the
FP NLL's ``z * SE`` (``z = Phi^-1(1 - alpha/2)``, 1.645 for 90%) are independent and combined in quadrature:
``ppl_low = ppl_fp exp(delta - sqrt((delta - lo)^2 + (z SE)^2))`` and ``ppl_high = ppl_fp exp(delta + sqrt((hi -
delta)^2 + (z SE)^2))`` (:func:`combine_interval`; the predictors do it from the ``nll_fp_se`` column).

:func:`full_eval_cost` is the one estimate of what measuring a recipe would have cost: the measured forward seconds
per 256-token window (of the FP measurement: the zoo card's full-split evaluation, the cached or fresh
measurement, or a timing of two windows) x the windows of the full WikiText-2 test split x 2 (the FP and the
quantized model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpredict.errors import PredictorError
from quantpredict.recipe import DEFAULT_FP_WINDOWS  # noqa: F401  (re-exported; the CLI's help reads it from there)

SEQ_LEN = 256
#: bump when how the FP reference is measured changes: older cached entries stop matching
FP_VERSION = 1
PREDICTED = "predicted"
SOURCES = ("--ppl-fp", PREDICTED, "zoo card", "cache", "measured")
TIMING_WINDOWS = 2


@dataclass(frozen=True)
class FPReference:
    """The FP perplexity quantized perplexities are built on.

    ``ppl``: the FP perplexity (NaN when ``source == "predicted"``: the predictor fills it in per row); ``nll_se``:
    the standard error of its NLL (NaN: not known); ``source``: one of :data:`SOURCES`; ``setting``: the evaluation
    setting's label (``seq256-wall``, ``seq256-w64-bos``); ``windows``/``tokens``: windows and predicted tokens
    measured; ``forward_seconds_per_window``, ``full_split_windows``, ``timing``: what :func:`full_eval_cost` reads
    (the timing's origin in words); ``path``: the cache file; ``seconds``: what resolving it cost now."""

    ppl: float
    nll_se: float = math.nan
    source: str = "measured"
    setting: str = ""
    windows: int | None = None
    tokens: int | None = None
    forward_seconds_per_window: float | None = None
    full_split_windows: int | None = None
    timing: str = ""
    path: str | None = None
    seconds: float = 0.0

    @property
    def predicted(self) -> bool:
        return self.source == PREDICTED

    @property
    def nll(self) -> float:
        return math.log(self.ppl) if self.ppl > 0 else math.nan

    @property
    def ppl_se(self) -> float:
        """Delta-method SE of the perplexity, ``ppl * nll_se``."""
        return self.ppl * self.nll_se

    def columns(self) -> dict[str, float]:
        """What a predictor's input row carries: ``ppl_fp`` and ``nll_fp_se`` (none for a predicted FP)."""
        if self.predicted:
            return {}
        return {"ppl_fp": float(self.ppl), "nll_fp_se": float(self.nll_se) if math.isfinite(self.nll_se) else 0.0}

    def where(self) -> str:
        """How the FP perplexity was obtained, in words (source, evaluation, SE)."""
        se = "" if math.isfinite(self.nll_se) else ", SE not recorded"
        windows = (f"{self.windows:,} windows of {SEQ_LEN} tokens" if self.windows else "")
        what = f"WikiText-2 test, {windows}" + (", BOS protocol" if self.setting.endswith("-bos") else "")
        if self.source == "zoo card":
            return f"zoo card: full WikiText-2 test split{', ' + windows if windows else ''}{se}"
        if self.source == "cache":
            return f"measured on {what}{se}; read from the cache {self.path}"
        if self.source == "measured":
            return f"measured now on {what} in {self.seconds:.1f} s{se}; cached at {self.path}"
        if self.source == "--ppl-fp":
            return "given with --ppl-fp; SE not given, so the intervals carry no FP uncertainty"
        return ("predicted from the calibration NLL (--ppl-fp predicted), not measured: its own interval widens "
                "every perplexity interval")

    def describe(self, value: float | None = None) -> str:
        """``FP perplexity 34.79 ± 1.07 (measured on ...)``; ``value``: the predicted FP, for a predicted one."""
        ppl = self.ppl if not self.predicted else (value if value is not None else math.nan)
        se = f" ± {self.ppl_se:.2f}" if math.isfinite(self.nll_se) and not self.predicted else ""
        label = "FP perplexity (predicted)" if self.predicted else "FP perplexity"
        return f"{label} {ppl:.2f}{se} ({self.where()})"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ppl_se"] = self.ppl_se
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def check_ppl_fp(value: Any, flag: str = "--ppl-fp") -> float | str:
    """``value`` as an FP perplexity: a finite number of at least 1, or ``"predicted"``; anything else raises
    :class:`PredictorError` naming ``flag``."""
    if isinstance(value, str) and value.strip().lower() == PREDICTED:
        return PREDICTED
    try:  # float() takes numbers and numeric strings alike
        v = float(value)
    except (TypeError, ValueError):
        raise PredictorError(f"{flag} {value!r}: give the model's measured FP perplexity (a number >= 1) or "
                             f"'{PREDICTED}'") from None
    if not (math.isfinite(v) and v >= 1.0):
        raise PredictorError(f"{flag} {value!r}: a perplexity is exp(NLL) with NLL >= 0, so it must be a finite "
                             f"number of at least 1 (or '{PREDICTED}' to predict it)")
    return v


def check_fp_windows(n: Any, flag: str = "--fp-windows") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PredictorError(f"{flag} {n!r}: the number of WikiText-2 test windows to measure the FP perplexity on "
                             "must be a positive integer")
    return n


def combine_interval(delta, low, high, log_fp, nll_fp_se, alpha: float = 0.1):
    """``(ppl, ppl_low, ppl_high)``: the quantized perplexity ``exp(log_fp + delta)`` and its interval, the delta
    interval ``[low, high]`` and the FP NLL's ``z * nll_fp_se`` combined in quadrature in log space (see the module
    docstring). Arrays or floats."""
    import numpy as np
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2)
    fp_half = z * np.nan_to_num(np.asarray(nll_fp_se, float), nan=0.0)
    d = np.asarray(delta, float)
    lo_w = np.sqrt((d - np.asarray(low, float)) ** 2 + fp_half**2)
    hi_w = np.sqrt((np.asarray(high, float) - d) ** 2 + fp_half**2)
    log_fp = np.asarray(log_fp, float)
    return np.exp(log_fp + d), np.exp(log_fp + d - lo_w), np.exp(log_fp + d + hi_w)


# ---- the resolver ---------------------------------------------------------------------------------------------------
def fp_root() -> Path:
    """``<profiles root>/fp``: ``$QUANTPREDICT_HOME/profiles/fp`` by default (``$QUANTPREDICT_PROFILES/fp``)."""
    from quantpredict.predict.profile_cache import profiles_root

    return profiles_root() / "fp"


def _card(name: Any) -> dict | None:
    if not isinstance(name, str):
        return None
    from quantpredict.models import zoo_card

    try:
        card = zoo_card(name)
    except Exception:  # noqa: BLE001 -- not a zoo model (a path, an imported model without a measurement)
        return None
    ppl = card.get("test_ppl")
    if not ppl or not (math.isfinite(float(ppl)) and float(ppl) >= 1):
        return None
    return card


def _card_reference(card: dict) -> FPReference:
    seq = int(card.get("eval_seq_len") or SEQ_LEN)
    tokens = card.get("test_tokens")
    windows = int(tokens) // (seq - 1) if tokens else None
    secs = card.get("test_eval_seconds")
    ppl = math.exp(float(card["test_nll"])) if card.get("test_nll") is not None else float(card["test_ppl"])
    se = card.get("test_nll_se")
    return FPReference(
        ppl=ppl, nll_se=float(se) if se is not None else math.nan, source="zoo card", setting=f"seq{seq}-wall",
        windows=windows, tokens=int(tokens) if tokens else None,
        forward_seconds_per_window=(float(secs) / windows) if secs and windows else None,
        full_split_windows=windows, timing="the zoo card's full-split FP evaluation" if secs else "")


def key_parts(model_or_path: Any, model: Any, tokenizer: Any, fp_windows: int) -> dict[str, Any]:
    """Everything a cached FP measurement depends on: the weights, the tokenizer, the test text, the setting."""
    import hashlib

    from quantpredict import data
    from quantpredict.predict.profile_cache import weights_id
    from quantpredict.recipe import EvalSetting
    from quantpredict.version import MEASUREMENT_VERSION

    bos = data.eval_protocol(tokenizer).bos_id is not None
    text = data.load_text("wikitext2", "test")
    return {"fp_version": FP_VERSION, "measurement_version": MEASUREMENT_VERSION,
            "weights": weights_id(model_or_path, model), "tokenizer": data._tokenizer_key(tokenizer)[:16],
            "text": "wikitext2:test:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            "setting": EvalSetting(seq_len=SEQ_LEN, max_windows=fp_windows, bos=bos).label}


def cache_path(name: str, parts: dict[str, Any], root: Path | None = None) -> Path:
    from quantpredict.predict.profile_cache import cache_key

    key = cache_key(parts)
    base = Path(str(name).rstrip("/\\")).name or "model"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"
    return (root or fp_root()) / f"{base[:64]}-{key[:16]}.json"


def _read(path: Path, parts: dict[str, Any]) -> FPReference | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("parts") != parts:
            return None
        r = doc["reference"]
        return FPReference(ppl=float(r["ppl"]), nll_se=float(r["nll_se"]) if r.get("nll_se") is not None
                           else math.nan, source="cache", setting=str(r["setting"]), windows=r.get("windows"),
                           tokens=r.get("tokens"), forward_seconds_per_window=r.get("forward_seconds_per_window"),
                           full_split_windows=r.get("full_split_windows"), timing="the cached FP measurement",
                           path=str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, parts: dict[str, Any], ref: FPReference) -> bool:
    from quantpredict.predict.profile_cache import write_json_atomic

    return write_json_atomic(path, {"parts": parts, "reference": ref.to_dict()})


def _full_split_windows(tokenizer) -> int:
    from quantpredict import data

    bos = data.eval_protocol(tokenizer).bos_id is not None
    return int(data.token_ids(tokenizer, "wikitext2", "test").numel() // (SEQ_LEN - 1 if bos else SEQ_LEN))


def _measure(model, tokenizer, fp_windows: int) -> FPReference:
    from quantpredict.evaluate.perplexity import perplexity
    from quantpredict.recipe import EvalSetting

    res = perplexity(model, tokenizer, seq_len=SEQ_LEN, max_windows=fp_windows, batch_size=4, progress=False)
    forward = max(res.seconds - res.tokenize_seconds, 0.0) / max(res.windows, 1)
    return FPReference(ppl=float(res.ppl), nll_se=float(res.nll_se), source="measured",
                       setting=EvalSetting(seq_len=SEQ_LEN, max_windows=fp_windows, bos=res.bos).label,
                       windows=res.windows, tokens=res.tokens, forward_seconds_per_window=forward,
                       full_split_windows=_full_split_windows(tokenizer), timing="the FP measurement",
                       seconds=res.seconds)


def _time_forward(model, tokenizer) -> tuple[float, int]:
    """Seconds per window of a forward pass over the first :data:`TIMING_WINDOWS` test windows, and the full
    split's windows (for a given or predicted FP with nothing cached to time)."""
    timed = _measure(model, tokenizer, TIMING_WINDOWS)
    return timed.forward_seconds_per_window, timed.full_split_windows


def resolve_fp_reference(model_or_path: Any, *, model: Any = None, tokenizer: Any = None, ppl_fp: Any = None,
                         fp_windows: int | None = None, name: str | None = None, cache: bool = True,
                         flag: str = "--ppl-fp") -> FPReference:
    """The FP reference of ``model_or_path`` (a zoo name, an imported model, an HF directory, or a loaded model),
    from ``ppl_fp`` (a number, ``"predicted"`` or an :class:`FPReference`), else the zoo card, else the cache, else
    measured now on ``fp_windows`` windows (default :data:`DEFAULT_FP_WINDOWS`) and cached (``cache=False``: neither
    read nor written). ``model``/``tokenizer``: the loaded model and its tokenizer (loaded here when needed);
    ``name``: the model's name for the card and the cache file (default ``model_or_path`` when a string). Raises
    :class:`PredictorError` (naming ``flag``) for an invalid ``ppl_fp``, and when the FP must be measured but no
    tokenizer is known."""
    if isinstance(ppl_fp, FPReference):
        return ppl_fp
    given = None if ppl_fp is None else check_ppl_fp(ppl_fp, flag)
    fp_windows = DEFAULT_FP_WINDOWS if fp_windows is None else check_fp_windows(fp_windows)
    name = name or (str(model_or_path) if isinstance(model_or_path, (str, Path)) else None)
    card = _card(name) if isinstance(model_or_path, (str, Path)) or name else None
    card_ref = _card_reference(card) if card is not None else None
    if given is None and card_ref is not None:
        return card_ref

    def load(need_model: bool) -> None:
        nonlocal model, tokenizer
        if tokenizer is None or (need_model and model is None):
            if not isinstance(model_or_path, (str, Path)):
                raise PredictorError("the FP perplexity must be measured on WikiText-2 test, which needs the model's "
                                     "tokenizer: pass tokenizer= (or ppl_fp=: a measured number, or 'predicted')")
            from quantpredict import models

            if need_model:
                m, t = models.load(str(model_or_path))
                model, tokenizer = model if model is not None else m, tokenizer if tokenizer is not None else t
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(models.resolve(model_or_path)), local_files_only=True)

    def lookup() -> tuple[FPReference | None, Path, dict]:
        from quantpredict.errors import QuantpredictError

        load(need_model=not isinstance(model_or_path, (str, Path)))
        try:
            parts = key_parts(model_or_path, model, tokenizer, fp_windows)
        except QuantpredictError:  # a name the weights cannot be found by (a model object named so): its tensors
            if model is None:
                raise
            parts = key_parts(model, model, tokenizer, fp_windows)
        path = cache_path(name or type(model).__name__, parts)
        return (_read(path, parts) if cache else None), path, parts

    if given is None:
        cached, path, parts = lookup()
        if cached is not None:
            return cached
        load(need_model=True)
        ref = _measure(model, tokenizer, fp_windows)
        return dataclasses.replace(ref, path=str(path) if cache and _write(path, parts, ref) else None)
    # a given or predicted FP: its value is the user's (or the predictor's); the timing comes from what is known: the
    # card, the cache, else a timing of two windows (none without a tokenizer: the cost is then unknown)
    timed, fwd, n_split, timing = card_ref, None, None, ""
    can_load = isinstance(model_or_path, (str, Path)) or tokenizer is not None
    if timed is None and cache and can_load:
        timed = lookup()[0]
    if timed is not None:
        fwd, n_split, timing = timed.forward_seconds_per_window, timed.full_split_windows, timed.timing
    elif can_load:
        load(need_model=True)
        t0 = time.perf_counter()
        fwd, n_split = _time_forward(model, tokenizer)
        timing = f"a timing of {TIMING_WINDOWS} windows ({time.perf_counter() - t0:.1f} s)"
    if given == PREDICTED:
        return FPReference(ppl=math.nan, source=PREDICTED, forward_seconds_per_window=fwd,
                           full_split_windows=n_split, timing=timing)
    return FPReference(ppl=float(given), source="--ppl-fp", forward_seconds_per_window=fwd,
                       full_split_windows=n_split, timing=timing)


# ---- the cost model -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalCost:
    """What measuring one recipe on the full WikiText-2 test split would cost: ``seconds`` (None when unknown) =
    ``forward_seconds_per_window`` x ``windows`` x 2 (FP and quantized); ``how``: that computation in words."""

    seconds: float | None
    forward_seconds_per_window: float | None
    windows: int | None
    how: str

    def text(self) -> str:
        if self.seconds is None:
            return "a full WikiText-2 test evaluation of one recipe: n/a (no forward timing known)"
        return f"a full WikiText-2 test evaluation of one recipe: ~{self.seconds:.0f} s (estimated: {self.how})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def full_eval_cost(ref: FPReference) -> EvalCost:
    """The one estimate every command prints of what a full evaluation of a recipe would have cost: the FP
    reference's measured forward seconds per 256-token window x the full test split's windows x 2 (one FP and one
    quantized forward pass per window; quantizing the weights not counted)."""
    fwd, n = ref.forward_seconds_per_window, ref.full_split_windows
    if not fwd or not n:
        return EvalCost(None, fwd, n, "no forward timing known")
    return EvalCost(2.0 * fwd * n, fwd, n, f"{fwd:.3f} s per {SEQ_LEN}-token forward window ({ref.timing}) x "
                                           f"{n:,} windows of the full test split x 2 (FP and quantized)")


def attach(frame, ref: FPReference) -> None:
    """Put the FP reference's columns on a predictor input ``frame`` (in place)."""
    for k, v in ref.columns().items():
        frame[k] = v


def label_output(out, ref: FPReference) -> None:
    """Name the FP reference's source on a predictor output (``ppl_fp_source``, in place) and add
    ``ppl_increase_pct`` (the quantized perplexity's increase over the FP one, percent)."""
    import numpy as np

    if not ref.predicted:
        out["ppl_fp_source"] = ref.source
    out["ppl_increase_pct"] = 100.0 * np.expm1(np.asarray(out["delta_nll"], float))
