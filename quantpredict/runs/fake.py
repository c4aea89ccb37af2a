"""A fast, deterministic stand-in for :func:`quantpredict.runs.execute.execute_run`.

It returns a result of the real shape (comparison, every schema feature, timings) derived from the run key, so
sweeps, stores, executors and reports can be exercised in seconds without models: ``quantpredict collect
--run-fn quantpredict.runs.fake:fake_run --no-weights-hash ...``. Its numbers are not measurements.
"""

from __future__ import annotations

import hashlib
import math
import re
import time


def _unit(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) from the key."""
    return int(hashlib.sha256(f"{salt}|{key}".encode()).hexdigest()[:12], 16) / 16**12


def fake_run(spec, *, sleep_s: float = 0.0, fail_formats=(), fail_models=(), **_ignored) -> dict:
    """Pretend to quantize and evaluate ``spec``: sleeps ``sleep_s``, raises for formats/models listed to fail."""
    from quantpredict.runs.store import _schema

    FEATURE_NAMES, TIMING_NAMES = _schema()
    if sleep_s:
        time.sleep(sleep_s)
    if spec.weight_format in tuple(fail_formats) or spec.model in tuple(fail_models):
        raise RuntimeError(f"fake failure for {spec.model} / {spec.weight_format}")
    digits = re.findall(r"\d+", spec.weight_format)
    bits = float(digits[0]) if digits else 8.0
    nll_fp = 3.0 + _unit(spec.model, "nll")
    delta = 2.0 ** (-1.3 * bits) * (0.5 if spec.method == "gptq" else 1.0) * (1 + _unit(spec.key, "d"))
    windows = spec.evaluation.max_windows or 64
    comparison = {
        "ppl_fp": math.exp(nll_fp), "ppl_quant": math.exp(nll_fp + delta), "nll_fp": nll_fp,
        "nll_quant": nll_fp + delta, "delta_nll": delta, "delta_nll_se": delta * 0.05, "kld": delta * 1.1,
        "top1_agree": 1.0 - min(0.9, delta), "eval_tokens": windows * spec.seq_len, "windows": windows,
        "seconds": sleep_s,
    }
    features = {name: _unit(spec.key, name) for name in FEATURE_NAMES}
    features |= {"bits_per_element": bits + 8 / (spec.block_size or 32), "block_size": spec.block_size or 4096}
    features |= {name: 0.0 for name in TIMING_NAMES}
    return {"family": "fake", "n_params": 1000 + int(1000 * _unit(spec.model, "n")), "recipe": spec.label,
            "comparison": comparison, "features": features, "timings": {"run_total_seconds": sleep_s}}
