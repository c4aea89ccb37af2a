"""The arithmetic task (traces, spans), the task model's decoder (dense and on-the-fly sparse), and a quick e2e run."""

from __future__ import annotations

import random

import pytest
import torch

from quantpredict.attention.arith import (
    ArithTokenizer,
    SpanTracker,
    context_tokens,
    make_dataset,
    make_example,
    max_operands,
    span_starts,
)
from quantpredict.attention.arith_eval import answer_of, eval_arith
from quantpredict.attention.arith_model import (
    ArithModelSpec,
    TrainConfig,
    build_model,
    forward,
    generate,
    load_model,
    span_mask,
    train_arith,
)
from quantpredict.errors import DataError, ModelError

TINY = ArithModelSpec(hidden=32, layers=2, heads=2, intermediate=64, width=16, max_positions=512)


def _left_to_right(operands, ops) -> int:
    acc = operands[0]
    for op, b in zip(ops, operands[1:]):
        acc = {"+": acc + b, "-": acc - b, "*": acc * b}[op] % 10
    return acc


def test_example_trace_by_hand():
    tok = ArithTokenizer()
    e = make_example(3, random.Random(0), width=12)
    text = tok.decode(tok.encode(e.tokens))
    lines = text.split("\n")
    assert lines[-1] == "<eos>" and len(lines) == 4
    assert all(len(tok.encode(e.tokens[i * 12:(i + 1) * 12])) == 12 for i in range(3))
    a, o = list(e.operands), list(e.ops)
    assert lines[0] == "<bos>" + f"{a[0]}{o[0]}{a[1]}{o[1]}{a[2]}" + "." * 5
    r1 = _left_to_right(a[:2], o[:1])
    assert lines[1] == f">{r1}{o[1]}{a[2]}" + "." * 7
    assert lines[2] == f">{e.answer}" + "." * 9
    assert e.n_prompt == 12 and e.n_tokens == context_tokens(3, 12) == 37


def test_answers_match_an_independent_evaluation():
    for e in make_dataset(50, (1, 20), seed=1):
        assert e.answer == _left_to_right(e.operands, e.ops)
    assert make_dataset(3, 5, seed=7) == make_dataset(3, 5, seed=7)
    assert context_tokens(22) == 2113 and max_operands(64) == 31 and max_operands(96) == 47


def test_too_many_operands_is_a_data_error():
    with pytest.raises(DataError, match="wider line"):
        make_example(max_operands(16) + 1, random.Random(0), width=16)


def test_span_starts_by_hand_and_markers():
    tok = ArithTokenizer()
    e = make_example(4, random.Random(0), width=10)  # lines at 0, 10, 20, 30; <eos> at 40
    s = span_starts(tok.encode(e.tokens), tok)
    assert s[:10] == [0] * 10  # the question attends itself
    assert s[10:20] == [0] * 10 and s[20:30] == [10] * 10 and s[30:40] == [20] * 10
    assert s[40] == 20  # <eos> keeps the last line's span
    # a "^2" marker reaches two lines back; a line without a marker falls back to dense
    ids = tok.encode(["<bos>", "1", "\n", ">", "2", "\n", "^2", "3", "\n", "4", "5"])
    assert span_starts(ids, tok) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    ids = tok.encode(["<bos>", "\n", ">", "\n", ">", "\n", "^2", "\n", "9"])
    assert span_starts(ids, tok) == [0, 0, 0, 0, 2, 2, 2, 2, 0]


def test_span_tracker_is_incremental():
    tok = ArithTokenizer()
    ids = tok.encode(make_example(6, random.Random(3), width=16).tokens)
    tr = SpanTracker(tok)
    assert [tr.push(t) for t in ids] == span_starts(ids, tok)


def test_tokenizer_rejects_unknown_tokens():
    with pytest.raises(DataError, match="unknown token"):
        ArithTokenizer().encode(["/"])


def test_forward_equals_hf_model():
    model = build_model(TINY).eval()
    ids = torch.tensor([ArithTokenizer().encode(make_example(4, random.Random(0), TINY.width).tokens)])
    with torch.no_grad():
        assert torch.allclose(forward(model, ids), model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("sparse,sink", [(False, 0), (True, 0), (True, 1), (True, 2)])
def test_decoder_logits_equal_full_forward_under_the_same_mask(sparse, sink):
    """Teacher-forced incremental decoding (KV cache, on-the-fly spans, sparse gather) reproduces the full-sequence
    forward under the span mask (sparse) or the causal mask (dense), at every step; with sink blocks, spans that
    start inside the sink read one contiguous run and later ones a gathered list."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    tok = ArithTokenizer()
    e = make_example(7, random.Random(5), TINY.width)  # 7 lines of 16 -> spans over 2-3 blocks of 8
    ids = torch.tensor([tok.encode(e.tokens)] * 2)
    P = e.n_prompt
    res = generate(model, ids[:, :P], ids.shape[1], sparse=sparse, block_size=8, sink_blocks=sink,
                   forced=ids[:, P:], keep_logits=True)
    mask = span_mask(ids[0], tok, block_size=8, sink_blocks=sink) if sparse else None
    with torch.no_grad():
        ref = forward(model, ids, mask)[:, P - 1:]
    assert res.logits.shape == ref.shape
    assert torch.allclose(res.logits, ref, atol=1e-4, rtol=1e-4)
    if sparse:
        assert 0 < res.density < 0.6 + 0.2 * sink
        assert mask.float().mean() < 0.5 + 0.2 * sink
    else:
        assert res.density == 1.0


def test_greedy_generation_is_consistent_with_forward():
    torch.manual_seed(1)
    model = build_model(TINY).eval()
    tok = ArithTokenizer()
    e = make_example(3, random.Random(0), TINY.width)
    prompt = torch.tensor([tok.encode(e.tokens[: e.n_prompt])])
    res = generate(model, prompt, 40, sparse=False)
    out = torch.tensor([res.tokens[0]])
    with torch.no_grad():
        pred = forward(model, out[:, :-1]).argmax(-1)[0, e.n_prompt - 1:]
    assert pred.tolist() == res.tokens[0][e.n_prompt:]


def test_answer_of():
    tok = ArithTokenizer()
    e = make_example(5, random.Random(2), 16)
    ids = tok.encode(e.tokens)
    assert answer_of(ids, tok) == e.answer
    assert answer_of(ids[:-1], tok) is None  # unfinished


def test_load_model_missing_dir(tmp_path):
    with pytest.raises(ModelError, match="train-arith"):
        load_model(tmp_path)


@pytest.mark.e2e
def test_train_and_eval_end_to_end(tmp_path, monkeypatch):
    """A few seconds of training of a tiny model, then dense vs sparse evaluation and the report section."""
    out = train_arith(tmp_path / "m", TrainConfig(minutes=0.05, threads=1, tokens_per_step=256, max_operands=4),
                      TINY, log=lambda s: None)
    assert (out / "model.safetensors").exists() and (out / "checkpoint.pt").exists()
    model, spec = load_model(out)
    assert spec == TINY
    res = eval_arith(out, [3], n_examples=2, batch_size=2, out=tmp_path)
    r = res[0]
    assert r.context_tokens == 3 * 16 + 1 and r.n_examples == 2
    assert 0 < r.density <= 1 and r.dense_tok_s > 0 and r.sparse_tok_s > 0
    assert 0 <= r.dense_answer_acc <= 1
    text = (tmp_path / "attention.md").read_text()
    assert "Part 2" in text and "| 3 | 49 | 2 |" in text
    # resuming an exhausted budget trains no further and keeps the step count
    before = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    train_arith(out, TrainConfig(minutes=0.05, threads=1, tokens_per_step=256, max_operands=4), TINY,
                log=lambda s: None)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == before
