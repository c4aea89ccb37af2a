"""The real run: load a model, quantize a copy, measure both on WikiText-2 test, extract the features.

This is the default ``run_fn`` of :func:`quantpredict.runs.collect`; it runs on workers and returns a plain dict
(the driver writes it to the store).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from pathlib import Path


@functools.cache
def fp_logits_cache():
    """One :class:`~quantpredict.evaluate.FPLogitsCache` per worker process, made on first use (importing
    ``quantpredict.runs`` for the store alone must not pull in torch). A sweep runs a model's recipes back to back,
    and every comparison after the first reuses the FP model's logits on the evaluation windows."""
    import os
    import tempfile

    from quantpredict.evaluate import FPLogitsCache

    # logits too large for memory (a real model's 49k vocabulary) go to memory-mapped files of this process's own
    cache = FPLogitsCache(directory=Path(tempfile.gettempdir()) / f"quantpredict-fp-logits-{os.getpid()}")
    import atexit

    atexit.register(cache.close)
    return cache


def _ptq(model, recipe, calib, *, batch_size: int, progress: bool, max_memory=None):
    from quantpredict import quantize

    return quantize.quantize_model(model, recipe, calib, batch_size=batch_size, progress=progress,
                                   max_memory=max_memory)


def _qat(model, recipe, calib, *, batch_size: int, progress: bool, max_memory=None):
    from quantpredict.qat import run_qat

    return run_qat(model, recipe, calib, progress=progress)  # QAT batches come from the recipe (qat_batch_size)


#: How a recipe is carried out, by :func:`procedure`: post-training quantization, or QAT on top of it.
PROCEDURES = {"ptq": _ptq, "qat": _qat}


def procedure(recipe) -> str:
    """The :data:`PROCEDURES` entry that carries ``recipe`` out."""
    return "qat" if recipe.qat else "ptq"


def training_tokens(model: str) -> dict:
    """The model's pre-training tokens and tokens per non-embedding parameter, where its card knows them (zoo and
    imported models): a recipe-independent model attribute of every run (``{}`` for a model without a card)."""
    from quantpredict.errors import ModelError
    from quantpredict.models import zoo_card

    try:
        card = zoo_card(model)
    except ModelError:
        return {}
    tokens, nonembed = card.get("tokens_trained"), card.get("n_params_nonembed")
    if not tokens or not nonembed:
        return {}
    return {"tokens_trained": float(tokens), "tokens_per_param": float(tokens) / float(nonembed)}


def execute_run(spec, *, torch_threads: int | None = None, batch_size: int = 8, feature_options: dict | None = None,
                progress: bool = False, calib_text: str | None = None, eval_text: str | None = None,
                device: str | None = None, max_memory: int | str | None = None) -> dict:
    """Measure one :class:`~quantpredict.runs.RunSpec`.

    Steps: ``models.load(spec.model)`` (float32) -> deep copy -> quantize the copy as ``spec.recipe()`` says (PTQ,
    or QAT on top of it; :data:`PROCEDURES`) on calibration windows of WikiText-2 *train* (or ``calib_text``) ->
    ``evaluate.compare(fp, quantized, tokenizer, seq_len=spec.seq_len, max_windows=spec.eval_max_windows)`` on
    WikiText-2 *test* (or ``eval_text``, whose sha256 prefix must be the spec's ``evaluation.text``), both models
    on the same windows and under the model's protocol (BOS when its tokenizer prepends one) ->
    ``features.extract(fp, recipe, calib)``. ``torch_threads`` caps intra-op threads (set it to cores / workers
    when several runs share a machine). ``device`` (``"cuda"``; default CPU) is where the models run and
    ``max_memory`` the working-memory budget of calibration and features (``memory.DEFAULT_MAX_MEMORY``); both
    change where and in how many pieces the numbers are computed, not the numbers (up to float rounding on another
    device), so they are not part of the run key. Returns ``family``, ``n_params``, ``recipe`` (the backend's label),
    ``recipe_dict``, ``comparison`` (``Comparison.to_dict()``), ``features`` (with ``<group>_seconds``), ``quant``
    (the quantization report's summary), ``protocol`` and ``timings`` (seconds per stage).
    """
    import torch

    from quantpredict import arch, data, evaluate, features, models
    from quantpredict.errors import DataError
    from quantpredict.threads import torch_threads as thread_limit  # the parameter shadows the name

    with thread_limit(torch_threads):
        timings: dict[str, float] = {}
        t = time.perf_counter()
        model_fp, tok = models.load(spec.model, dtype=torch.float32, attn_implementation="eager", device=device)
        timings["run_load_seconds"] = time.perf_counter() - t

        recipe = spec.recipe()
        protocol = data.eval_protocol(tok)
        if protocol.bos != spec.evaluation.bos:
            raise DataError(f"run {spec.key}: the model's tokenizer {'prepends' if protocol.bos else 'adds no'} BOS, "
                            "but the run was planned with the other protocol; plan it again "
                            "(collect probes the tokenizer)")
        calib = data.token_stream(tok, "wikitext2", "train", text_file=calib_text, protocol=protocol)  # never test
        t = time.perf_counter()
        model_q = copy.deepcopy(model_fp)
        report = PROCEDURES[procedure(recipe)](model_q, recipe, calib, batch_size=batch_size, progress=progress,
                                               max_memory=max_memory)
        timings["run_quantize_seconds"] = time.perf_counter() - t

        evaluation = spec.evaluation
        if eval_text is not None:  # a spec rebuilt from store columns names its text by the hash alone
            if evaluation.text is None:
                raise DataError(f"run {spec.key}: the evaluation text {eval_text} is not the one the run was planned "
                                "with")
            evaluation = dataclasses.replace(evaluation, text_file=str(eval_text))
        t = time.perf_counter()
        # the setting as planned: compare reads its text file and checks it still hashes to the setting's text
        cmp = evaluate.compare(model_fp, model_q, tok, evaluation, batch_size=batch_size, progress=progress,
                               fp_cache=fp_logits_cache(), fp_key=spec.model_id)
        timings["run_eval_seconds"] = time.perf_counter() - t
        del model_q

        t = time.perf_counter()
        feature_options = dict(feature_options or {})
        if max_memory is not None:
            feature_options.setdefault("max_memory", max_memory)
        feats = features.extract(model_fp, recipe, calib, **feature_options)
        timings["run_features_seconds"] = time.perf_counter() - t

        summary = report.summary() if hasattr(report, "summary") else {}
        return {
            **training_tokens(spec.model),
            "family": arch.family(model_fp),
            "n_params": int(sum(p.numel() for p in model_fp.parameters())),
            "recipe": getattr(report, "label", recipe.label),  # a QAT result's label reads `qat`/`qat_gptq`
            "recipe_dict": recipe.to_dict(),
            "comparison": cmp.to_dict(),
            "features": dict(feats),
            "quant": summary,
            "protocol": protocol.to_dict() | {"calib_source": calib.source, "eval_source": cmp.source},
            "timings": timings,
        }
