"""execute_run's one-copy path (issue #31): features first, the FP side of the comparison into the FP cache, the model
quantized in place and compared with the cache in strict mode. Its numbers must be the two-copy path's, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from quantpredict import evaluate, features, models, quantize
from quantpredict.errors import ModelError
from quantpredict.evaluate import FPLogitsCache, scoring
from quantpredict.quantize import plan
from quantpredict.recipe import EvalSetting, Recipe
from quantpredict.runs import execute
from quantpredict.runs.spec import RunSpec

FEATURES = {"n_windows": 2, "seq_len": 32, "n_probes": 2, "max_iter": 2}
SETTING = EvalSetting(32, 4)  # 4 windows in batches of 3 and 1: a short last batch too


@pytest.fixture
def fp_cache():
    """The process's FP cache, empty before and after (each path must compute its own FP side)."""
    cache = execute.fp_logits_cache()
    old = cache.max_bytes
    cache.close()
    cache.hits = 0  # close() keeps the count; an earlier test's runs (tests/test_resume.py) went through this cache
    yield cache
    cache.close()
    cache.max_bytes = old


def _run(model: str, method: str, **kw) -> dict:
    spec = RunSpec(model, Recipe("int4", method=method), SETTING)
    return execute.execute_run(spec, torch_threads=1, batch_size=3, feature_options=FEATURES, **kw)


def _numbers(d: dict) -> dict:
    """A result's values but wall times."""
    return {k: v for k, v in d.items() if not k.endswith("seconds")}


def _same(a, b) -> bool:
    """Exact equality, NaN equal to NaN (a feature a tiny model cannot measure is NaN on both paths)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("mode", ["logits", "hidden", "disk"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model", ["llama-xs", "gpt2-xs"])
def test_one_copy_equals_two_copies(model, method, mode, fp_cache, monkeypatch):
    """Same windows, same batches, the same FP forward passes (only run earlier, before quantizing): the comparison
    and the features are identical, not merely close. ``hidden``: a chunk budget small enough to put even a
    4096-token vocabulary in chunked mode (the cache keeps hidden states, the head is read from the model given);
    ``disk``: the cache's entry on memory-mapped files."""
    if mode == "hidden":
        monkeypatch.setattr(scoring, "LOGITS_CHUNK_BYTES", 64 * 1024)  # 4 tokens of 4096 float32 logits
    if mode == "disk":
        fp_cache.max_bytes = 0
    one = _run(model, method)
    assert fp_cache.entry[-1] == ("hidden" if mode == "hidden" else 3)  # the mode the FP side was kept in
    assert fp_cache.hits == 2 and fp_cache._on_disk == (mode == "disk")  # both batches came from the cache
    fp_cache.close()
    fp_cache.hits = 0
    two = _run(model, method, _one_copy=False)
    assert fp_cache.hits == 0  # the two-copy path ran its FP model in-line
    assert _same(_numbers(one["comparison"]), _numbers(two["comparison"]))
    assert _same(_numbers(one["features"]), _numbers(two["features"]))
    assert _same({k: v for k, v in one.items() if k not in ("comparison", "features", "timings", "quant")},
                 {k: v for k, v in two.items() if k not in ("comparison", "features", "timings", "quant")})
    assert one["comparison"]["kld"] > 0


def test_features_leave_the_model_as_it_was():
    """What the one-copy path relies on when it extracts the features first."""
    model, tok = models.load("llama-xs", dtype=torch.float32, attn_implementation="eager")
    from quantpredict import data

    calib = data.token_stream(tok, "wikitext2", "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(p.requires_grad, p.dtype) for p in model.parameters()]
    features.extract(model, Recipe("int4", method="gptq"), calib, **FEATURES)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(p.requires_grad, p.dtype) for p in model.parameters()] and not model.training


def test_strict_cache_raises_on_a_miss():
    model, tok = models.load("gpt2-xs", dtype=torch.float32)
    cache = FPLogitsCache()
    with cache.strict(), pytest.raises(ModelError, match="misses batch 0"):
        evaluate.compare(model, model, tok, SETTING, batch_size=3, fp_cache=cache, fp_key="gpt2-xs")
    assert not cache.strict_mode  # restored
    assert evaluate.fill_fp_cache(model, tok, SETTING, fp_cache=cache, fp_key="gpt2-xs", batch_size=3)
    with cache.strict():
        cmp = evaluate.compare(model, model, tok, SETTING, batch_size=3, fp_cache=cache, fp_key="gpt2-xs")
        assert cmp.kld == 0.0 and cmp.delta_nll == 0.0 and cache.hits == 2
        with pytest.raises(ModelError, match="misses batch 0"):  # another batch size: another entry
            evaluate.compare(model, model, tok, SETTING, batch_size=2, fp_cache=cache, fp_key="gpt2-xs")
        with pytest.raises(ModelError, match="fp_key"):
            evaluate.compare(model, model, tok, SETTING, batch_size=3, fp_cache=cache)
    # an entry the cache cannot keep (too large for memory, no directory): fill declines, strict compare raises
    small = FPLogitsCache(max_bytes=0)
    assert not evaluate.fill_fp_cache(model, tok, SETTING, fp_cache=small, fp_key="gpt2-xs", batch_size=3)
    with small.strict(), pytest.raises(ModelError, match="cannot hold"):
        evaluate.compare(model, model, tok, SETTING, batch_size=3, fp_cache=small, fp_key="gpt2-xs")


def test_one_copy_only_where_the_head_and_embeddings_stay(monkeypatch):
    model, _ = models.load("llama-xs", dtype=torch.float32)
    assert execute.one_copy_applies(model, Recipe("int4"))
    assert not execute.one_copy_applies(model, Recipe("int4", qat=True))  # QAT trains the whole model
    real = plan.layer_plan(model, Recipe("int4"))
    head = quantize.PlannedLayer(type(real[0].ref)("lm_head", model.get_output_embeddings(), 0), "int4", None)
    monkeypatch.setattr(plan, "layer_plan", lambda m, r, b=None: [*real, head])  # a future mix naming the head
    assert not quantize.keeps_head_and_embeddings(model, Recipe("int4"))
    assert not execute.one_copy_applies(model, Recipe("int4"))


def test_without_features_measures_the_same(fp_cache):
    """``extract_features=False`` (a large model's sweep, features backfilled later) changes nothing measured: the
    comparison and the quantization report are the run's with features, and the features are empty."""
    spec = RunSpec("llama-xs", Recipe("int4", method="rtn", awq=True), SETTING)
    full = execute.execute_run(spec, torch_threads=1, batch_size=3, feature_options=FEATURES, resume=False)
    fp_cache.close()
    bare = execute.execute_run(spec, torch_threads=1, batch_size=3, feature_options=FEATURES, resume=False,
                               extract_features=False)
    assert full["features"] and bare["features"] == {}
    assert "run_features_seconds" not in bare["timings"]
    assert _same(_numbers(full["comparison"]), _numbers(bare["comparison"]))
    assert _same(_numbers(full["quant"]), _numbers(bare["quant"]))
