"""quantpredict.evaluate against independent float64 hand-rolled loops on tiny models, plus the error paths."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model

from quantpredict import data, evaluate
from quantpredict.errors import DataError, ModelError
from quantpredict.evaluate import make_windows
from quantpredict.evaluate.stats import ratio_mean_se

L = 32  # window length used throughout: tiny models cover 128 positions


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


def _hand_window_nll(model, window: torch.Tensor, first: int = 1) -> tuple[float, int]:
    """Summed NLL (float64) of positions first..len-1 of one window, one forward pass, no batching."""
    with torch.no_grad():
        logits = model(input_ids=window[None]).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for j in range(first, len(window)):
        total -= float(logp[j - 1, window[j]])
    return total, len(window) - first


def _hand_perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None):
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    per_window = [_hand_window_nll(model, ids[k * seq_len : (k + 1) * seq_len]) for k in range(n)]
    total = sum(s for s, _ in per_window)
    count = sum(c for _, c in per_window)
    return math.exp(total / count), np.array([s / c for s, c in per_window]), count


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox"])
def test_perplexity_matches_hand_loop_remainder_dropped(family):
    model = tiny_model(family)
    ids = _stream(5 * L + 7)  # 7 tokens of remainder are dropped
    res = evaluate.perplexity_of_ids(model, ids, seq_len=L, batch_size=2, progress=False)
    ppl, per_window, count = _hand_perplexity(model, ids, L)
    assert isinstance(res, float) and isinstance(res, evaluate.PerplexityResult)
    assert res.windows == 5 and res.tokens == count == 5 * (L - 1)
    assert res == pytest.approx(ppl, rel=1e-6)
    assert res.nll == pytest.approx(math.log(ppl), abs=1e-6)
    # the standard error is over windows: numpy's sample std / sqrt(n) of the per-window mean NLLs
    assert res.nll_se == pytest.approx(per_window.std(ddof=1) / math.sqrt(len(per_window)), rel=1e-4)
    assert res.ppl_se == pytest.approx(float(res) * res.nll_se)


def test_perplexity_on_the_dataset_prefix(tokenizer):
    model = tiny_model("llama")
    res = evaluate.perplexity(model, tokenizer, seq_len=L, max_windows=4, batch_size=3, progress=False)
    # independent tokenization of the verbatim test text (a prefix: 4 windows lie far inside its first 20k chars)
    ids = torch.tensor(tokenizer(data.load_text("wikitext2", "test")[:20_000], add_special_tokens=False)["input_ids"])
    ppl, _, count = _hand_perplexity(model, ids, L, max_windows=4)
    assert res == pytest.approx(ppl, rel=1e-6)
    assert (res.tokens, res.windows, res.seq_len, res.dataset, res.split) == (count, 4, L, "wikitext2", "test")
    assert 0 <= res.tokenize_seconds < res.seconds and res.tokens_per_second > 0
    d = res.to_dict()
    assert d["ppl"] == float(res) and d["nll_se"] == res.nll_se and json.loads(json.dumps(d)) == d
    again = pickle.loads(pickle.dumps(res))
    assert again == res and again.to_dict() == d


def test_batch_size_does_not_change_the_result():
    model = tiny_model("gpt2")
    ids = _stream(7 * L)
    a = evaluate.perplexity_of_ids(model, ids, seq_len=L, batch_size=1, progress=False)
    b = evaluate.perplexity_of_ids(model, ids, seq_len=L, batch_size=4, progress=False)
    assert a == pytest.approx(b, rel=1e-6) and a.nll_se == pytest.approx(b.nll_se, rel=1e-4)


def test_training_mode_restored_and_dropout_off():
    model = tiny_model("gpt2")  # GPT-2 has dropout 0.1 by default
    ids = _stream(4 * L)
    ref = evaluate.perplexity_of_ids(model, ids, seq_len=L, progress=False)
    model.train()
    res = evaluate.perplexity_of_ids(model, ids, seq_len=L, progress=False)
    assert model.training and res == pytest.approx(ref, rel=1e-7)


def _hf_sliding_window_ppl(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """The sliding-window loop of the transformers perplexity guide, in float64 (labels masked to new tokens)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        new = end - prev_end
        window = ids[begin:end]
        first = max(1, len(window) - new)
        s, c = _hand_window_nll(model, window, first)
        total, count, prev_end = total + s, count + c, end
        if end == len(ids):
            break
    return math.exp(total / count), count


def test_stride_matches_the_sliding_window_loop():
    model = tiny_model("llama")
    stride = 8
    ids = _stream(L + 9 * stride)  # windows end exactly at the last token, as in the guide's loop
    res = evaluate.perplexity_of_ids(model, ids, seq_len=L, stride=stride, batch_size=4, progress=False)
    ppl, count = _hf_sliding_window_ppl(model, ids, L, stride)
    assert res.tokens == count == len(ids) - 1 and res.windows == 10 and res.stride == stride
    assert res == pytest.approx(ppl, rel=1e-6)


@pytest.mark.parametrize("n_tokens,stride", [(100, 7), (L, 5), (L + 1, 31), (333, 1)])
def test_sliding_windows_score_each_token_once_with_enough_context(n_tokens, stride):
    ids = torch.arange(n_tokens)  # ids == positions, so windows reveal where they were cut
    w = make_windows(ids, L, stride=stride)
    assert w.ids.shape[1] == L and torch.all(w.ids[:, 1:] - w.ids[:, :-1] == 1)
    scored = torch.cat([w.ids[k, int(w.first_scored[k]):] for k in range(w.n)])
    assert sorted(scored.tolist()) == list(range(1, n_tokens))  # every token after the first, exactly once
    assert int(w.first_scored[0]) == 1 and torch.all(w.first_scored[1:] >= L - stride)
    assert w.scored_tokens == n_tokens - 1
    assert make_windows(ids, L, stride=stride, max_windows=2).n == min(2, w.n)


def test_unequal_window_standard_error_is_the_ratio_estimator():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 40, size=12).astype(float)
    sums = counts * rng.normal(4.0, 0.3, size=12)
    mean, se = ratio_mean_se(sums, counts)
    r = sums.sum() / counts.sum()
    textbook = math.sqrt(np.sum((sums - r * counts) ** 2) / (12 * 11 * counts.mean() ** 2))  # Cochran (6.9)
    assert mean == pytest.approx(r) and se == pytest.approx(textbook)
    assert math.isnan(ratio_mean_se(sums[:1], counts[:1])[1])


def test_window_nlls_building_block():
    model = tiny_model("opt")
    windows = _stream(3 * L).view(3, L)
    got = evaluate.window_nlls(model, windows, batch_size=2)
    want = [s / c for s, c in (_hand_window_nll(model, w) for w in windows)]
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_compare_model_against_itself():
    model = tiny_model("llama")
    ids = _stream(6 * L)
    c = evaluate.compare_ids(model, model, ids, seq_len=L, batch_size=4, progress=False)
    ref = evaluate.perplexity_of_ids(model, ids, seq_len=L, progress=False)
    assert c.delta_nll == 0 and c.delta_nll_se == 0 and c.delta_ppl == 0
    assert c.kld == 0 and c.top1_agreement_pct == 100.0
    assert c.ppl_fp == pytest.approx(float(ref), rel=1e-6) and c.nll_fp_se == pytest.approx(ref.nll_se, rel=1e-4)
    assert (c.eval_tokens, c.windows, c.seq_len) == (6 * (L - 1), 6, L)


def _perturbed(model, scale: float = 0.3, seed: int = 1):
    q = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return q


def test_compare_perturbed_copy_matches_float64_hand_computation():
    model = tiny_model("llama")
    q = _perturbed(model)
    ids = _stream(5 * L)
    c = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False)
    nlls_fp, nlls_q, klds, agree = [], [], [], []
    for w in ids.view(5, L):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(q(input_ids=w[None]).logits[0, :-1].double(), -1)
        t = w[1:]
        nlls_fp.append(-lp[torch.arange(L - 1), t].mean().item())
        nlls_q.append(-lq[torch.arange(L - 1), t].mean().item())
        klds.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
        agree.append((lp.argmax(-1) == lq.argmax(-1)).double().mean().item())
    nlls_fp, nlls_q, klds = np.array(nlls_fp), np.array(nlls_q), np.array(klds)
    d = nlls_q - nlls_fp
    assert c.kld > 0 and c.top1_agreement_pct < 100
    assert c.kld == pytest.approx(klds.mean(), rel=1e-5)
    assert c.top1_agreement_pct == pytest.approx(100 * np.mean(agree))
    assert c.delta_nll == pytest.approx(d.mean(), abs=1e-6)
    assert np.allclose(c.window_delta_nll, d, atol=1e-6) and list(c.window_tokens) == [L - 1] * 5
    # paired standard errors: over per-window differences, not the two perplexities' own errors
    assert c.delta_nll_se == pytest.approx(d.std(ddof=1) / math.sqrt(5), rel=1e-3)
    assert c.kld_se == pytest.approx(klds.std(ddof=1) / math.sqrt(5), rel=1e-3)
    # delta-method SE of exp(nll_q) - exp(nll_fp) from the covariance of the per-window means
    cov = np.cov(np.stack([nlls_fp, nlls_q])) / 5
    grad = np.array([-math.exp(nlls_fp.mean()), math.exp(nlls_q.mean())])
    assert c.delta_ppl_se == pytest.approx(math.sqrt(grad @ cov @ grad), rel=1e-3)
    assert c.delta_ppl == pytest.approx(c.ppl_quant - c.ppl_fp)
    assert c.ppl_quant == pytest.approx(math.exp(nlls_q.mean()), rel=1e-6)
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()


def _float64_reference(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor):
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    delta = (lp - lq).gather(-1, t[:, None]).squeeze(-1)
    return kld, delta, -lp.gather(-1, t[:, None]).squeeze(-1)


@pytest.mark.parametrize("scale", [1e-3, 0.05, 2.0])
def test_token_comparison_keeps_float64_precision(scale):
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(200, 4096, generator=g)
    b = a * (1 + scale * torch.randn(200, 4096, generator=g))  # a perturbed copy: b ~ a elementwise
    t = torch.randint(0, 4096, (200,), generator=g)
    got = evaluate.token_comparison(a, b, t)
    kld, delta, nll = _float64_reference(a, b, t)
    # per token to ~1e-8 nats even where KL itself is ~3e-5 (plain float32 log-softmax errs by ~5e-7 here)
    assert torch.allclose(got["kld"].double(), kld, rtol=5e-4, atol=1e-8)
    assert torch.allclose(got["delta_nll"].double(), delta, rtol=1e-4, atol=1e-8)
    assert torch.allclose(got["nll_fp"].double(), nll, rtol=1e-6)
    assert torch.equal(got["top1"], (a.argmax(-1) == b.argmax(-1)).float())
    # logits offset by a constant make a - b inexact in float32: then it is as good as plain float32, no better
    shifted = evaluate.token_comparison(a, b + 7.0, t)
    assert torch.allclose(shifted["kld"].double(), _float64_reference(a, b + 7.0, t)[0], atol=5e-6)


def test_token_comparison_falls_back_where_logits_differ_hugely():
    a = torch.zeros(3, 50)
    b = a.clone()
    b[0, 7] = 200.0  # the quantized model puts all its mass on one token the FP model finds unremarkable
    b[1, :] = torch.linspace(-90, 90, 50)
    t = torch.tensor([7, 3, 0])
    got = evaluate.token_comparison(a, b, t)
    kld, delta, _ = _float64_reference(a, b, t)
    assert torch.isfinite(got["kld"]).all() and got["kld"][2] == 0
    assert torch.allclose(got["kld"].double(), kld, rtol=1e-6) and torch.allclose(got["delta_nll"].double(), delta)


def test_non_finite_logits_are_a_clear_model_error():
    model = tiny_model("llama")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ids = _stream(3 * L)
    with pytest.raises(ModelError, match="quantized model produced non-finite logits"):
        evaluate.compare_ids(model, broken, ids, seq_len=L)
    with pytest.raises(ModelError, match="non-finite logits .* on window 0"):
        evaluate.perplexity_of_ids(broken, ids, seq_len=L)


def test_compare_one_window_on_the_dataset(tokenizer):
    model = tiny_model("gpt_neox")
    q = _perturbed(model, scale=0.1)
    c = evaluate.compare(model, q, tokenizer, seq_len=L, max_windows=1, progress=False)
    w = data.token_ids(tokenizer, "wikitext2", "test")[:L]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
        lq = torch.log_softmax(q(input_ids=w[None]).logits[0, :-1].double(), -1)
    assert c.kld == pytest.approx((lp.exp() * (lp - lq)).sum(-1).mean().item(), rel=1e-6)
    assert c.windows == 1 and math.isnan(c.kld_se) and math.isnan(c.delta_nll_se)


def test_error_paths(tokenizer, monkeypatch):
    model = tiny_model("llama")
    ids = _stream(100)
    with pytest.raises(DataError, match="empty"):
        evaluate.perplexity_of_ids(model, torch.tensor([], dtype=torch.long), seq_len=L)
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        evaluate.perplexity_of_ids(model, ids, seq_len=1)
    with pytest.raises(DataError, match="fewer than one window"):
        evaluate.perplexity_of_ids(model, ids, seq_len=101)
    with pytest.raises(DataError, match="stride must be between 1 and"):
        evaluate.perplexity_of_ids(model, ids, seq_len=L, stride=L)
    with pytest.raises(DataError, match="max_windows"):
        evaluate.perplexity_of_ids(model, ids, seq_len=L, max_windows=0)
    with pytest.raises(DataError, match="batch_size"):
        evaluate.perplexity_of_ids(model, ids, seq_len=L, batch_size=0)
    with pytest.raises(DataError, match="at most 128"):  # tiny models have 128 positions
        evaluate.perplexity_of_ids(model, _stream(300), seq_len=129)
    with pytest.raises(ModelError, match="own tokenizer"):
        evaluate.perplexity_of_ids(model, torch.full((64,), VOCAB + 5), seq_len=L)
    with pytest.raises(DataError, match="valid names"):
        evaluate.perplexity(model, tokenizer, dataset="c4")
    with pytest.raises(DataError, match="valid splits"):
        evaluate.perplexity(model, tokenizer, split="dev")
    with pytest.raises(ModelError, match="vocabulary"):
        other = tiny_model("llama")
        other.resize_token_embeddings(VOCAB + 8)
        evaluate.compare_ids(model, other, ids, seq_len=L)
    monkeypatch.setattr(data, "token_ids", lambda *a, **k: torch.tensor([], dtype=torch.long))
    with pytest.raises(DataError, match="wikitext2 test tokens are empty"):
        evaluate.perplexity(model, tokenizer)
    with pytest.raises(DataError, match="empty"):
        evaluate.compare(model, model, tokenizer)


# ---- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_eval_text_json_and_against(tiny_hf_dir, capsys):
    from quantpredict.cli import main
    from quantpredict.models import load

    args = ["eval", str(tiny_hf_dir), "--seq-len", str(L), "--max-windows", "3", "--batch-size", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "nats/token" in out and "3 windows of 32 tokens, 93 predicted tokens" in out

    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tok = load(tiny_hf_dir)
    ref = evaluate.perplexity(model, tok, seq_len=L, max_windows=3, progress=False)
    assert got["ppl"] == pytest.approx(float(ref), rel=1e-9) and got["tokens"] == 93 and got["windows"] == 3
    assert got["nll_se"] == pytest.approx(ref.nll_se, rel=1e-6) and got["model"] == str(tiny_hf_dir)

    assert main([*args, "--against", str(tiny_hf_dir), "--json"]) == 0
    cmp_ = json.loads(capsys.readouterr().out)
    assert cmp_["delta_nll"] == 0 and cmp_["kld"] == 0 and cmp_["top1_agreement_pct"] == 100
    assert cmp_["ppl_fp"] == pytest.approx(float(ref), rel=1e-6) and cmp_["against"] == str(tiny_hf_dir)
    assert main([*args, "--against", str(tiny_hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "KL(FP || model)" in out and "top-1 agreement" in out and "100.00" in out


def test_cli_eval_errors_are_one_clear_line(tiny_hf_dir, tmp_path, capsys):
    from quantpredict.cli import main

    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["eval", str(tiny_hf_dir), "--dataset", "c4"]) == 2
    err = capsys.readouterr().err
    assert "valid names" in err and "Traceback" not in err


def test_fp_logits_cache_reuses_the_fp_side_and_changes_nothing():
    model = tiny_model("llama")
    q = _perturbed(model)
    ids = _stream(6 * L)
    plain = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False)
    cache = evaluate.FPLogitsCache()
    first = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False, fp_cache=cache, fp_key="m")
    assert cache.hits == 0 and len(cache.logits) == 3
    # a different "FP" model under the same key: the cached logits stand in for it, so the result is unchanged
    other = tiny_model("llama", seed=5)
    again = evaluate.compare_ids(other, q, ids, seq_len=L, batch_size=2, progress=False, fp_cache=cache, fp_key="m")
    assert cache.hits == 3
    for c in (first, again):
        assert c.delta_nll == pytest.approx(plain.delta_nll, abs=1e-9)
        assert c.kld == pytest.approx(plain.kld, rel=1e-9)
    # other windows or another key start a fresh entry; a budget too small keeps nothing
    evaluate.compare_ids(model, q, ids[L:], seq_len=L, batch_size=2, progress=False, fp_cache=cache, fp_key="m")
    assert cache.hits == 3
    tiny = evaluate.FPLogitsCache(max_bytes=10)
    evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False, fp_cache=tiny, fp_key="m")
    assert tiny.logits == {}


def test_fp_logits_cache_on_disk_when_over_budget(tmp_path):
    model = tiny_model("llama")
    q = _perturbed(model)
    ids = _stream(6 * L)
    plain = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False)
    disk = evaluate.FPLogitsCache(max_bytes=10, directory=tmp_path / "fp")
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "foreign.npy").write_bytes(b"not ours")
    evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=2, progress=False, fp_cache=disk, fp_key="m")
    assert disk.logits == {} and len(list((tmp_path / "fp").glob("fp-logits-*.npy"))) == 3
    other = tiny_model("llama", seed=5)  # the mapped FP logits stand in for it
    again = evaluate.compare_ids(other, q, ids, seq_len=L, batch_size=2, progress=False, fp_cache=disk, fp_key="m")
    assert disk.hits == 3 and again.kld == pytest.approx(plain.kld, rel=1e-9)
    assert again.delta_nll == pytest.approx(plain.delta_nll, abs=1e-9)
    disk.close()
    assert [p.name for p in (tmp_path / "fp").iterdir()] == ["foreign.npy"]  # only its own files are deleted


def test_compare_and_perplexity_take_the_evaluation_setting(tokenizer, tmp_path):
    """One EvalSetting is compare's and perplexity's setting: the same numbers as its fields as keywords, and a
    setting naming a user's text reads the file it names and checks the file still hashes to it."""
    from quantpredict.recipe import EvalSetting

    model = tiny_model("gpt_neox")
    q = _perturbed(model, scale=0.1)
    setting = EvalSetting(L, 2)
    a = evaluate.compare(model, q, tokenizer, setting, progress=False)
    b = evaluate.compare(model, q, tokenizer, seq_len=L, max_windows=2, progress=False)
    assert a.to_dict() | {"seconds": 0, "tokenize_seconds": 0} == b.to_dict() | {"seconds": 0, "tokenize_seconds": 0}
    assert evaluate.compare(model, q, tokenizer, EvalSetting(L, 5), max_windows=2, progress=False).windows == 2
    assert float(evaluate.perplexity(model, tokenizer, setting, progress=False)) == \
        float(evaluate.perplexity(model, tokenizer, seq_len=L, max_windows=2, progress=False))
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_window'"):
        evaluate.compare(model, q, tokenizer, max_window=2)
    text = tmp_path / "t.txt"
    text.write_text(data.load_text("wikitext2", "test")[:20000])
    own = EvalSetting(L, 2).with_text_file(text)
    assert own.text and own.text_file == str(text) and own == EvalSetting(L, 2, text=own.text)  # the path not compared
    c = evaluate.compare(model, q, tokenizer, own, progress=False)
    assert c.source.endswith(own.text)
    with pytest.raises(DataError, match="no text file"):
        evaluate.compare(model, q, tokenizer, EvalSetting(L, 2, text=own.text), progress=False)
    text.write_text("something else entirely, " * 400)
    with pytest.raises(DataError, match="hashes to"):
        evaluate.compare(model, q, tokenizer, own, progress=False)


def test_scored_from_is_llama_cpps_second_half():
    """``scored_from=k``: each window's positions ``k ..`` are scored, the earlier ones are context only (llama.cpp's
    ``llama-perplexity`` protocol is ``seq_len=512, scored_from=257``); checked against a float64 loop."""
    model = tiny_model("llama")
    q = _perturbed(model)
    ids = _stream(4 * L)
    k = L // 2 + 1
    c = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=3, progress=False, scored_from=k)
    klds, d = [], []
    for w in ids.view(4, L):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=w[None]).logits[0, k - 1 : -1].double(), -1)
            lq = torch.log_softmax(q(input_ids=w[None]).logits[0, k - 1 : -1].double(), -1)
        t = w[k:]
        klds.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
        d.append((lp - lq)[torch.arange(len(t)), t].mean().item())
    assert list(c.window_tokens) == [L - k] * 4 and c.eval_tokens == 4 * (L - k) and c.scored_from == k
    assert c.kld == pytest.approx(np.mean(klds), rel=1e-5)
    assert c.delta_nll == pytest.approx(np.mean(d), abs=1e-6)
    whole = evaluate.compare_ids(model, q, ids, seq_len=L, batch_size=3, progress=False)
    assert whole.eval_tokens == 4 * (L - 1) and whole.kld != c.kld
    # with BOS in front the first scored position is still k; the layout errors are clear
    w = make_windows(ids, L, bos_id=0, scored_from=k)
    assert w.first_scored.tolist() == [k] * w.n
    with pytest.raises(DataError, match="non-overlapping"):
        make_windows(ids, L, stride=4, scored_from=k)
    with pytest.raises(DataError, match="between 1 and seq_len - 1"):
        make_windows(ids, L, scored_from=L)
