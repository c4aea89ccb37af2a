"""Resumable long stages (issue #31): the block-by-block quantization continues from its checkpoint, the comparison
from its partial results, and either gives exactly what an uninterrupted run gives."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from quantpredict.quantize import Recipe, quantize_model
from quantpredict.quantize.checkpoint import MANIFEST, BlockCheckpoint


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupt(KeyboardInterrupt):
    """What a Ctrl-C (or a session's end) would raise between two blocks."""


def _interrupt_after(monkeypatch, cls, method: str, k: int) -> None:
    """``cls.method`` raises :class:`Interrupt` once the call with first argument ``k`` has returned."""
    original = getattr(cls, method)

    def wrapped(self, index, *args, **kw):
        out = original(self, index, *args, **kw)
        if index == k:
            raise Interrupt
        return out

    monkeypatch.setattr(cls, method, wrapped)


def _calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 320, (6, 24), generator=g)


RECIPES = {
    "gptq": Recipe("int4", method="gptq"),
    "awq+gptq": Recipe("int4", method="gptq", awq=True),
    "smoothquant+act": Recipe("mxint4", smoothquant_alpha=0.5, act_format="mxint8"),
}


@pytest.mark.parametrize("name,spill", [*((n, False) for n in RECIPES), ("gptq", True)])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_quantize_resumes_bit_for_bit(name, k, spill, tmp_path, monkeypatch):
    """Interrupted after block ``k`` of 3 (k = 2: after the last one, before the report), then run again with the
    same checkpoint: every weight is the uninterrupted run's, and so is the report but for its wall times.
    ``spill``: the hidden states between blocks in files, as under a small memory budget."""
    recipe = RECIPES[name]
    calib = _calib()
    full = tiny_model("llama", layers=3)
    if spill:
        from quantpredict.quantize import offload

        monkeypatch.setattr(offload, "spill_to_disk", lambda *a: True)
    ref = quantize_model(full, recipe, calib, batch_size=4, progress=False)

    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, BlockCheckpoint, "save", k)
        with pytest.raises(Interrupt):
            quantize_model(tiny_model("llama", layers=3), recipe, calib, batch_size=4, progress=False,
                           checkpoint=ckpt)
    assert json.loads((ckpt / MANIFEST).read_text())["done"] == k + 1
    resumed = tiny_model("llama", layers=3)
    rep = quantize_model(resumed, recipe, calib, batch_size=4, progress=False, checkpoint=ckpt)

    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda d: {k: v for k, v in d.items() if "seconds" not in k}  # noqa: E731
    assert [strip(r.__dict__) for r in rep.layers] == [strip(r.__dict__) for r in ref.layers]
    assert rep.awq == ref.awq and rep.awq_clips == ref.awq_clips
    assert strip(rep.summary()) == strip(ref.summary())
    ids = calib[:2]
    assert torch.equal(full(ids).logits, resumed(ids).logits)  # activation fake-quant hooks restored too


def test_stale_checkpoint_is_discarded(tmp_path, monkeypatch, caplog):
    """A checkpoint of another recipe is never used: it is deleted (with a warning) and the pass starts over."""
    calib = _calib()
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, BlockCheckpoint, "save", 0)
        with pytest.raises(Interrupt):
            quantize_model(tiny_model("llama", layers=3), Recipe("int4", method="gptq"), calib, progress=False,
                           checkpoint=ckpt)
    (ckpt / "unrelated.txt").write_text("kept")
    other = Recipe("int8", method="gptq")
    model = tiny_model("llama", layers=3)
    with caplog.at_level("WARNING"):
        quantize_model(model, other, calib, progress=False, checkpoint=ckpt)
    assert "discarding" in caplog.text
    ref = tiny_model("llama", layers=3)
    quantize_model(ref, other, calib, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(ref.state_dict().values(), model.state_dict().values()))
    assert (ckpt / "unrelated.txt").read_text() == "kept"
    assert json.loads((ckpt / MANIFEST).read_text())["done"] == 3
    assert not list(ckpt.glob("acts-*"))  # no activations once every block is done


# ---- the comparison ------------------------------------------------------------------------------------------------


def _interrupt_after_batch(monkeypatch, k: int) -> None:
    """:meth:`PartialResults.save` raises :class:`Interrupt` once it has recorded batch ``k`` (1-based) done."""
    from quantpredict.evaluate import PartialResults

    original = PartialResults.save

    def wrapped(self, entry, batches, sums):
        original(self, entry, batches, sums)
        if batches == k:
            raise Interrupt

    monkeypatch.setattr(PartialResults, "save", wrapped)


def _pair():
    fp = tiny_model("llama")
    q = tiny_model("llama")
    quantize_model(q, Recipe("int4"), None, progress=False)
    return fp, q


def _ids():
    return torch.randint(3, 320, (400,), generator=torch.Generator().manual_seed(1))


def _numbers(cmp) -> dict:
    return {k: v for k, v in cmp.to_dict().items() if not k.endswith("seconds")}


@pytest.mark.parametrize("k", [1, 2])
def test_compare_resumes_exactly(k, tmp_path, monkeypatch):
    """5 windows in batches of 2 (a short last one), interrupted after batch ``k``: the resumed comparison scores
    only the batches after it, and every total, standard error and per-window value is the uninterrupted one."""
    from quantpredict.evaluate import PartialResults, compare_ids, scoring

    fp, q = _pair()
    setting = dict(seq_len=32, max_windows=5, batch_size=2, progress=False)
    ref = compare_ids(fp, q, _ids(), **setting)
    partial = PartialResults(tmp_path / "cmp.pt", "llama-xs|int4")
    with monkeypatch.context() as m:
        _interrupt_after_batch(m, k)
        with pytest.raises(Interrupt):
            compare_ids(fp, q, _ids(), partial=partial, **setting)
    scored = []
    real = scoring.next_token_logits
    monkeypatch.setattr(scoring, "next_token_logits", lambda m, ids: scored.append(len(ids)) or real(m, ids))
    res = compare_ids(fp, q, _ids(), partial=partial, **setting)
    assert sum(scored) == 2 * (5 - 2 * k)  # both models, on the windows not yet done only
    assert _numbers(res) == _numbers(ref)


def test_compare_ignores_another_entry(tmp_path, monkeypatch):
    """Partial results of another key (or windows) are not used: every window is scored, and the file rewritten."""
    from quantpredict.evaluate import PartialResults, compare_ids

    fp, q = _pair()
    setting = dict(seq_len=32, max_windows=5, batch_size=2, progress=False)
    path = tmp_path / "cmp.pt"
    with monkeypatch.context() as m:
        _interrupt_after_batch(m, 1)
        with pytest.raises(Interrupt):
            compare_ids(fp, fp, _ids(), partial=PartialResults(path, "llama-xs|bf16"), **setting)
    res = compare_ids(fp, q, _ids(), partial=PartialResults(path, "llama-xs|int4"), **setting)
    assert _numbers(res) == _numbers(compare_ids(fp, q, _ids(), **setting))
    assert torch.load(path, weights_only=True)["batches"] == 3


def test_one_copy_comparison_resumes_from_a_strict_cache(tmp_path, monkeypatch):
    """The one-copy path: the FP side filled into the cache skips the windows already done, and the strict
    comparison finds every batch it still needs there."""
    from quantpredict.evaluate import FPLogitsCache, PartialResults
    from quantpredict.evaluate import scoring as sc
    from quantpredict.evaluate.windows import make_windows

    fp, q = _pair()
    windows = make_windows(_ids(), 32, max_windows=5)
    ref = sc.pair_sums(fp, q, windows, batch_size=2, progress=False)
    partial = PartialResults(tmp_path / "cmp.pt", "pair")
    with monkeypatch.context() as m:
        _interrupt_after_batch(m, 2)
        with pytest.raises(Interrupt):
            sc.pair_sums(fp, q, windows, batch_size=2, progress=False, partial=partial)
    cache = FPLogitsCache()
    assert sc.fill_fp_cache(fp, windows, cache, "fp", batch_size=2, progress=False, partial=partial)
    assert sorted(cache.logits) == [2]  # batches 0 and 1 were done: neither run nor cached
    with cache.strict():
        res = sc.pair_sums(q, q, windows, batch_size=2, progress=False, fp_cache=cache, fp_key="fp", partial=partial)
    assert all(torch.equal(res[k], ref[k]) for k in ref)


# ---- execute_run ---------------------------------------------------------------------------------------------------


@pytest.fixture
def run_home(tmp_path, monkeypatch):
    """``$QUANTPREDICT_HOME`` in a temporary folder, and the process's FP cache empty before and after."""
    from quantpredict.runs import execute

    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path / "home"))
    cache = execute.fp_logits_cache()
    cache.close()
    yield tmp_path / "home"
    cache.close()


def _spec():
    from quantpredict.recipe import EvalSetting
    from quantpredict.runs.spec import RunSpec

    return RunSpec("llama-xs", Recipe("int4", method="gptq"), EvalSetting(32, 4))


def _execute(**kw) -> dict:
    from quantpredict.runs import execute

    return execute.execute_run(_spec(), torch_threads=1, batch_size=3,
                               feature_options={"n_windows": 2, "seq_len": 32, "n_probes": 2, "max_iter": 2}, **kw)


def _same(a, b) -> bool:
    """Exact equality but wall times (keys ending in ``seconds``), NaN equal to NaN."""
    if isinstance(a, dict):
        keep = [k for k in a if not k.endswith("seconds")]
        return keep == [k for k in b if not k.endswith("seconds")] and all(_same(a[k], b[k]) for k in keep)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


@pytest.mark.parametrize("stage", ["quantize", "compare"])
def test_execute_run_resumes_where_it_was_killed(stage, run_home, monkeypatch):
    """Interrupted after GPTQ's first block, or after the comparison's first batch: the work directory stays, the
    same call continues from it (no block / window redone) and records what an uninterrupted run records; the
    directory is gone once the run has finished."""
    from quantpredict.evaluate import scoring
    from quantpredict.runs import execute

    ref = _execute(resume=False)
    work = execute.work_dir(_spec().key)
    assert work.parent == run_home / "resume" and not work.exists()
    execute.fp_logits_cache().close()
    with monkeypatch.context() as m:
        if stage == "quantize":
            _interrupt_after(m, BlockCheckpoint, "save", 0)
        else:
            _interrupt_after_batch(m, 1)
        with pytest.raises(Interrupt):
            _execute()
    assert work.is_dir()
    execute.fp_logits_cache().close()  # a new process: the FP cache is gone
    blocks, scored = [], []
    real_open, real_logits = BlockCheckpoint.open, scoring.next_token_logits
    monkeypatch.setattr(BlockCheckpoint, "open",
                        classmethod(lambda cls, *a: blocks.append(real_open(*a).done) or real_open(*a)))
    monkeypatch.setattr(scoring, "next_token_logits", lambda m, ids: scored.append(len(ids)) or real_logits(m, ids))
    resumed = _execute()
    assert blocks == [1 if stage == "quantize" else 2]  # llama-xs has 2 blocks
    if stage == "compare":
        assert sum(scored) == 2 * 1  # one window left of 4 (batches of 3 and 1): FP side and quantized side
    assert _same(resumed, ref)
    assert not work.exists()


def test_execute_run_failure_removes_the_work_directory(run_home, monkeypatch):
    """A run that fails with an error (recorded as failed; a retry starts over) leaves no work directory."""
    from quantpredict import evaluate
    from quantpredict.runs import execute

    def boom(*a, **kw):
        raise ValueError("boom")

    monkeypatch.setattr(evaluate, "compare", boom)
    with pytest.raises(ValueError, match="boom"):
        _execute()
    assert not execute.work_dir(_spec().key).exists()
