"""The real run: load a model, quantize a copy, measure both on WikiText-2 test, extract the features.

This is the default ``run_fn`` of :func:`quantpredict.runs.collect`; it runs on workers and returns a plain dict
(the driver writes it to the store).
"""

from __future__ import annotations

import copy
import functools
import time


@functools.cache
def fp_logits_cache():
    """One :class:`~quantpredict.evaluate.FPLogitsCache` per worker process, made on first use (importing
    ``quantpredict.runs`` for the store alone must not pull in torch). A sweep runs a model's recipes back to back,
    and every comparison after the first reuses the FP model's logits on the evaluation windows."""
    from quantpredict.evaluate import FPLogitsCache

    return FPLogitsCache()


def execute_run(spec, *, torch_threads: int | None = None, batch_size: int = 8, feature_options: dict | None = None,
                progress: bool = False) -> dict:
    """Measure one :class:`~quantpredict.runs.RunSpec`.

    Steps: ``models.load(spec.model)`` (float32) -> deep copy -> ``quantize.quantize_model(copy, recipe,
    calib_ids)`` with ``calib_ids`` = WikiText-2 *train* -> ``evaluate.compare(fp, quantized, tokenizer,
    seq_len=spec.seq_len, max_windows=spec.eval_max_windows)`` on WikiText-2 *test* (both models on the same
    windows) -> ``features.extract(fp, recipe, calib_ids)``. ``torch_threads`` caps intra-op threads (set it to
    cores / workers when several runs share a machine). Returns ``family``, ``n_params``, ``recipe`` (the
    backend's label), ``recipe_dict``, ``comparison`` (``Comparison.to_dict()``), ``features`` (with
    ``<group>_seconds``), ``quant`` (the quantization report's summary) and ``timings`` (seconds per stage).
    """
    import torch

    from quantpredict import arch, data, evaluate, features, models, quantize

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model_fp, tok = models.load(spec.model, dtype=torch.float32, attn_implementation="eager")
    timings["run_load_seconds"] = time.perf_counter() - t

    recipe = spec.recipe()
    calib_ids = data.token_ids(tok, "wikitext2", "train")  # calibration: train split only, never test
    t = time.perf_counter()
    model_q = copy.deepcopy(model_fp)
    if spec.method in ("qat", "qat_gptq"):  # QAT: PTQ init (recipe.method), then fine-tuning on the same windows
        from quantpredict.qat import run_qat

        report = run_qat(model_q, spec.method, recipe, calib_ids, batch_size=batch_size, progress=progress)
    else:
        report = quantize.quantize_model(model_q, recipe, calib_ids, batch_size=batch_size, progress=progress)
    timings["run_quantize_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    cmp = evaluate.compare(model_fp, model_q, tok, seq_len=spec.seq_len, max_windows=spec.eval_max_windows,
                           batch_size=batch_size, progress=progress, fp_cache=fp_logits_cache(), fp_key=spec.model_id)
    timings["run_eval_seconds"] = time.perf_counter() - t
    del model_q

    t = time.perf_counter()
    feats = features.extract(model_fp, recipe, calib_ids, **dict(feature_options or {}))
    timings["run_features_seconds"] = time.perf_counter() - t

    summary = report.summary() if hasattr(report, "summary") else {}
    return {
        "family": arch.family(model_fp),
        "n_params": int(sum(p.numel() for p in model_fp.parameters())),
        "recipe": getattr(report, "label", recipe.label),  # a QAT result's label reads `qat`/`qat_gptq`
        "recipe_dict": recipe.to_dict(),
        "comparison": cmp.to_dict(),
        "features": dict(feats),
        "quant": summary,
        "timings": timings,
    }
