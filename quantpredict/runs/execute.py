"""The real run: load a model, extract the features, quantize it, measure it against its FP side on WikiText-2 test.

This is the default ``run_fn`` of :func:`quantpredict.runs.collect`; it runs on workers and returns a plain dict
(the driver writes it to the store).

Its long stages resume: each run keeps a work directory, :func:`work_dir` (``$QUANTPREDICT_HOME/resume/<sha256 of
the run key>/``, default ``~/.cache/quantpredict/resume/...``), with the block-by-block quantization's checkpoint
(``quantize/``) and the comparison's finished windows (``compare.pt``). A run killed there (SIGTERM, SIGKILL, the
end of a session, Ctrl-C) leaves it, and the next ``collect`` of the same run continues at the next block or
window; the directory is removed when the run finishes, or fails with an error (an interrupt is not a failure).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import shutil
import time
from collections.abc import Iterator
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


def resume_root() -> Path:
    """Where runs keep their work directories: ``$QUANTPREDICT_HOME/resume`` (default
    ``~/.cache/quantpredict/resume``), beside the imported models and the profiles."""
    from quantpredict.models.imported import imported_root

    return imported_root().parent / "resume"


def work_dir(run_key: str) -> Path:
    """The work directory of the run ``run_key``: ``resume_root() / sha256(run_key)``."""
    return resume_root() / hashlib.sha256(run_key.encode()).hexdigest()


@contextlib.contextmanager
def _kept_until_done(directory: Path | None) -> Iterator[Path | None]:
    """``directory`` for the ``with``; removed after it, or when it raises an error, but left in place when an
    interrupt (KeyboardInterrupt, SystemExit) ends it, for the next attempt to resume from."""
    if directory is None:
        yield None
        return
    try:
        yield directory
    except Exception:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)


def _ptq(model, recipe, calib, *, batch_size: int, progress: bool, max_memory=None, checkpoint=None):
    from quantpredict import quantize

    return quantize.quantize_model(model, recipe, calib, batch_size=batch_size, progress=progress,
                                   max_memory=max_memory, checkpoint=checkpoint)


def _qat(model, recipe, calib, *, batch_size: int, progress: bool, max_memory=None, checkpoint=None):
    # QAT trains the whole model at once: nothing block by block to resume (``checkpoint`` is not read)
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


def one_copy_applies(model, recipe) -> bool:
    """Whether :func:`execute_run` may quantize the FP model itself instead of a deep copy: the recipe is PTQ (QAT
    trains the whole model) and leaves the LM head and the embeddings as they are
    (:func:`quantpredict.quantize.keeps_head_and_embeddings`), because the comparison then takes the FP side from
    the cache and reads the head of the model it is given, the quantized one."""
    from quantpredict.quantize import keeps_head_and_embeddings

    return procedure(recipe) == "ptq" and keeps_head_and_embeddings(model, recipe)


def _head_fingerprint(model) -> str:
    """sha256 of the head's and the embeddings' stored bytes (each tensor once; a tied head is the embedding), read
    in 64 MiB pieces so that a model on an accelerator is never copied whole to the host."""
    import hashlib

    import torch

    from quantpredict import arch, lmhead

    h = hashlib.sha256()
    seen = set()
    for m in [lmhead.head_module(model), *arch.embedding_modules(model)]:
        for p in m.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            flat = p.detach().contiguous().reshape(-1).view(torch.uint8)
            for piece in flat.split(64 * 2**20):
                h.update(piece.cpu().numpy().tobytes() if piece.device.type != "cpu" else piece.numpy())
    return h.hexdigest()


def execute_run(spec, *, torch_threads: int | None = None, batch_size: int = 8, feature_options: dict | None = None,
                progress: bool = False, calib_text: str | None = None, eval_text: str | None = None,
                device: str | None = None, max_memory: int | str | None = None, resume: bool = True,
                extract_features: bool = True, _one_copy: bool = True) -> dict:
    """Measure one :class:`~quantpredict.runs.RunSpec`.

    Steps: ``models.load(spec.model)`` (float32) -> quantize as ``spec.recipe()`` says (PTQ, or QAT on top of it;
    :data:`PROCEDURES`) on calibration windows of WikiText-2 *train* (or ``calib_text``) ->
    ``evaluate.compare(fp, quantized, tokenizer, seq_len=spec.seq_len, max_windows=spec.eval_max_windows)`` on
    WikiText-2 *test* (or ``eval_text``, whose sha256 prefix must be the spec's ``evaluation.text``), both models
    on the same windows and under the model's protocol (BOS when its tokenizer prepends one);
    ``features.extract(fp, recipe, calib)``.

    One copy of the model, where :func:`one_copy_applies` (PTQ, head and embeddings untouched: every recipe today):
    features first (they leave the model as it was), then ``evaluate.fill_fp_cache`` runs the FP side of the
    comparison alone into the process's :func:`fp_logits_cache` (the same windows and batches, logits or, for a
    large vocabulary, last hidden states), then the model is quantized *in place* and compared with the cache in
    strict mode, the quantized model standing in for the FP one (whose head alone the comparison reads: unchanged,
    which is checked by a hash of the head's and embeddings' bytes). Peak memory: one model + one batch's
    activations + the cache (in memory up to its ``max_bytes``, 2 GiB, on disk above) -- beside what features and
    quantization themselves use -- instead of two models (13.6 GiB at 1.5B in float32). The numbers are the
    two-copy path's, bit for bit. Otherwise (QAT, or a recipe that would quantize the head or embeddings), or when
    the cache cannot keep the FP side: a deep copy is quantized and compared with the FP model (two models).
    ``_one_copy=False`` forces that path (tests compare the two).

    ``torch_threads`` caps intra-op threads (set it to cores / workers when several runs share a machine).
    ``device`` (``"cuda"``; default CPU) is where the models run and ``max_memory`` the working-memory budget of
    calibration and features (``memory.DEFAULT_MAX_MEMORY``); both change where and in how many pieces the numbers
    are computed, not the numbers (up to float rounding on another device), so they are not part of the run key.
    ``resume`` (default): keep the run's :func:`work_dir` (module docstring), so that the run, killed during its
    quantization or comparison, continues where it stopped when it is run again, with the numbers of an
    uninterrupted run; the directory is removed when the run returns or raises an error. ``resume=False``: none.
    Features, loading and QAT are not resumable: they run again in full.
    ``extract_features=False``: no features (``features`` is ``{}``); ``quantpredict backfill`` adds them later.
    For an AWQ recipe every feature group reads the AWQ-scaled model, so extracting them runs the AWQ search a
    second time beside the run's own, unresumable (about two hours at 1.5B on one core): a sweep of large models
    measures first and backfills the features after.
    Returns ``family``, ``n_params``, ``recipe`` (the backend's label), ``recipe_dict``, ``comparison``
    (``Comparison.to_dict()``), ``features`` (with ``<group>_seconds``), ``quant`` (the quantization report's
    summary), ``protocol`` and ``timings`` (seconds per stage).
    """
    import torch

    from quantpredict import arch, data, evaluate, features, models
    from quantpredict.errors import DataError, ModelError
    from quantpredict.threads import torch_threads as thread_limit  # the parameter shadows the name

    with thread_limit(torch_threads), _kept_until_done(work_dir(spec.key) if resume else None) as work:
        partial = None if work is None else evaluate.PartialResults(work / "compare.pt", spec.key)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        model_fp, tok = models.load(spec.model, dtype=torch.float32, attn_implementation="eager", device=device)
        timings["run_load_seconds"] = time.perf_counter() - t
        family, n_params = arch.family(model_fp), int(sum(p.numel() for p in model_fp.parameters()))

        recipe = spec.recipe()
        protocol = data.eval_protocol(tok)
        if protocol.bos != spec.evaluation.bos:
            raise DataError(f"run {spec.key}: the model's tokenizer {'prepends' if protocol.bos else 'adds no'} BOS, "
                            "but the run was planned with the other protocol; plan it again "
                            "(collect probes the tokenizer)")
        calib = data.token_stream(tok, "wikitext2", "train", text_file=calib_text, protocol=protocol)  # never test
        evaluation = spec.evaluation
        if eval_text is not None:  # a spec rebuilt from store columns names its text by the hash alone
            if evaluation.text is None:
                raise DataError(f"run {spec.key}: the evaluation text {eval_text} is not the one the run was planned "
                                "with")
            evaluation = dataclasses.replace(evaluation, text_file=str(eval_text))
        feature_options = dict(feature_options or {})
        if max_memory is not None:
            feature_options.setdefault("max_memory", max_memory)

        def extract():
            if not extract_features:
                return {}
            t = time.perf_counter()
            feats = features.extract(model_fp, recipe, calib, **feature_options)
            timings["run_features_seconds"] = time.perf_counter() - t
            return feats

        cache = fp_logits_cache()
        one_copy = _one_copy and one_copy_applies(model_fp, recipe)
        fill_seconds, feats = 0.0, None
        if one_copy:
            feats = extract()  # before quantizing: features read the FP model and leave it as it was
            t = time.perf_counter()
            # the setting as planned: the text file is read and checked against the setting's hash
            one_copy = evaluate.fill_fp_cache(model_fp, tok, evaluation, fp_cache=cache, fp_key=spec.model_id,
                                              batch_size=batch_size, progress=progress, partial=partial)
            fill_seconds = time.perf_counter() - t
        t = time.perf_counter()
        model_q = model_fp if one_copy else copy.deepcopy(model_fp)
        head = _head_fingerprint(model_q) if one_copy else None
        report = PROCEDURES[procedure(recipe)](model_q, recipe, calib, batch_size=batch_size, progress=progress,
                                               max_memory=max_memory,
                                               checkpoint=None if work is None else work / "quantize")
        if one_copy and _head_fingerprint(model_q) != head:
            raise ModelError(f"run {spec.key}: quantizing changed the head or the embeddings, which the one-copy "
                             "comparison takes as the FP model's; quantize.keeps_head_and_embeddings must say so")
        timings["run_quantize_seconds"] = time.perf_counter() - t

        t = time.perf_counter()
        # one copy: the quantized model stands for the FP one, and every FP batch must come from the cache
        with cache.strict() if one_copy else contextlib.nullcontext():
            cmp = evaluate.compare(model_fp, model_q, tok, evaluation, batch_size=batch_size, progress=progress,
                                   fp_cache=cache, fp_key=spec.model_id, partial=partial)
        timings["run_eval_seconds"] = time.perf_counter() - t + fill_seconds
        del model_q
        if feats is None:
            feats = extract()

        summary = report.summary() if hasattr(report, "summary") else {}
        return {
            **training_tokens(spec.model),
            "family": family,
            "n_params": n_params,
            "recipe": getattr(report, "label", recipe.label),  # a QAT result's label reads `qat`/`qat_gptq`
            "recipe_dict": recipe.to_dict(),
            "comparison": cmp.to_dict(),
            "features": dict(feats),
            "quant": summary,
            "protocol": protocol.to_dict() | {"calib_source": calib.source, "eval_source": cmp.source},
            "timings": timings,
        }
