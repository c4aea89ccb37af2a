import pytest
import torch

from quantpredict import data
from quantpredict.errors import DataError


def test_wikitext2_splits_verbatim():
    test = data.load_text("wikitext2", "test")
    raw = (data.data_dir() / "wikitext-2" / "test.txt").read_bytes().decode("utf-8")
    assert test == raw
    train = data.load_text("wikitext2", "train")
    assert len(train.encode("utf-8")) == 10797148  # the zip member, byte for byte
    assert train.count("\n") == 36718


def test_unknown_names_list_valid_ones():
    with pytest.raises(DataError, match="wikitext2"):
        data.load_text("c4", "test")
    with pytest.raises(DataError, match="train, valid, test"):
        data.load_text("wikitext2", "dev")


def test_calibration_windows_seeded_and_validated():
    ids = torch.arange(1000)
    a = data.calibration_windows(ids, 4, 16, seed=1)
    b = data.calibration_windows(ids, 4, 16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    windows = torch.ones(3, 8, dtype=torch.long)
    assert data.calibration_windows(windows, 99, 99) is not None
    with pytest.raises(DataError, match="empty"):
        data.calibration_windows(torch.tensor([], dtype=torch.long), 4, 16)
    with pytest.raises(DataError, match="fewer than one window"):
        data.calibration_windows(torch.arange(10), 4, 16)


def test_token_ids_cached_by_tokenizer_content(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "b")
    a, b = AutoTokenizer.from_pretrained(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "b")
    calls = []
    real = data._encode
    data._TOKEN_CACHE.clear()
    try:
        data._encode = lambda tok, text: calls.append(1) or real(tok, text)
        ids = data.token_ids(a, "wikitext2", "valid")
        again = data.token_ids(b, "wikitext2", "valid")
    finally:
        data._encode = real
    assert len(calls) == 1 and torch.equal(again, ids)  # same content: one tokenization
    assert ids.dtype == torch.long and ids.numel() > 100_000
    assert ids[:50].tolist() == a(data.load_text("wikitext2", "valid")[:2000], add_special_tokens=False)[
        "input_ids"][:50]


def test_token_cache_hands_out_copies_and_is_bounded(tokenizer):
    data._TOKEN_CACHE.clear()
    first = data.token_ids(tokenizer, "wikitext2", "valid")
    first[:10] = -1  # a caller scribbling on its tensor
    assert int(data.token_ids(tokenizer, "wikitext2", "valid")[:10].min()) >= 0  # nobody else sees it
    cache = data._TokenCache(maxsize=2)
    for k in range(3):
        cache.get((k,), lambda k=k: torch.tensor([k]))
    assert list(cache._entries) == [(1,), (2,)]  # the least recently used entry went


def _bos_tokenizer(prepend: bool, *, unk: bool = False):
    """A tiny word-level tokenizer that prepends <s> (id 1) when ``prepend``, with a distinct <unk> when ``unk``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "the": 4, "cat": 5, "sat": 6, "<": 7, ">": 8, "unk": 9,
             "quick": 10, "brown": 11, "fox": 12, "The": 13}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepend:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = {"unk_token": "<unk>"} if unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **kw)


def test_protocol_is_decided_by_encoding_a_probe_not_by_the_attribute():
    with_bos, without = _bos_tokenizer(True), _bos_tokenizer(False)
    assert data.eval_protocol(with_bos) == data.Protocol(1) and data.eval_protocol(with_bos).bos
    assert data.eval_protocol(without) == data.Protocol(None)
    # Gemma-3's tokenizer reads add_bos_token False and still prepends id 2: only the encoding counts
    with_bos._add_bos_token = False
    assert with_bos.add_bos_token is False and with_bos("the")["input_ids"][0] == 1
    assert data.eval_protocol(with_bos).bos_id == 1


def test_unk_text_stays_text_under_a_tokenizer_with_a_distinct_unknown_token():
    tok = _bos_tokenizer(False, unk=True)
    plain = tok("the <unk> cat", add_special_tokens=False)["input_ids"]
    assert 3 in plain  # without the protocol the literal text becomes the unknown-token id
    ids = data._encode(tok, "the <unk> cat")
    assert ids.tolist() == [4, 7, 9, 8, 5] and 3 not in ids.tolist()


def test_bos_protocol_starts_every_calibration_and_evaluation_window_with_bos():
    from quantpredict.evaluate import make_windows

    ids = torch.arange(10, 110)
    stream = data.TokenStream(ids, 1, "test")
    calib = data.calibration_windows(stream, 5, 16, seed=0)
    assert calib.shape == (5, 16) and calib[:, 0].tolist() == [1] * 5 and int(calib[:, 1:].min()) >= 10
    win = make_windows(ids, 16, bos_id=1)
    assert win.ids[:, 0].tolist() == [1] * win.n and win.n == 100 // 15
    assert win.first_scored.tolist() == [1] * win.n  # every text token is scored, the first from BOS alone
    assert win.ids[0, 1:].tolist() == list(range(10, 25)) and win.ids[1, 1:].tolist() == list(range(25, 40))
    slide = make_windows(ids, 16, stride=5, bos_id=1)
    plain = make_windows(ids, 15, stride=5)
    assert slide.ids[:, 0].tolist() == [1] * slide.n and torch.equal(slide.ids[:, 1:], plain.ids)
    assert slide.first_scored[0] == 1 and torch.equal(slide.first_scored[1:], plain.first_scored[1:] + 1)
    # without BOS nothing changes: the zoo's windows (and run keys) stay as they were
    assert torch.equal(make_windows(ids, 16).ids, ids[:96].view(6, 16))


def test_token_stream_of_a_user_text_file(tmp_path, tokenizer):
    f = tmp_path / "mine.txt"
    f.write_text("The cat sat on the mat. " * 200, encoding="utf-8")
    stream = data.token_stream(tokenizer, text_file=f)
    assert stream.source.startswith("file:mine.txt#") and len(stream.text_sha) == 12
    assert stream.ids.numel() > 100
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="empty"):
        data.token_stream(tokenizer, text_file=tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        data.token_stream(tokenizer, text_file=tmp_path / "nope.txt")


def test_sampled_calibration_windows_follow_the_protocol_and_take_a_user_text(tmp_path):
    from quantpredict.quantize import sample_calibration

    f = tmp_path / "mine.txt"
    f.write_text("the quick brown fox sat the <unk> cat " * 400, encoding="utf-8")
    with_bos = sample_calibration(_bos_tokenizer(True, unk=True), 4, 12, seed=0, text_file=f)
    assert with_bos.shape == (4, 12) and with_bos[:, 0].tolist() == [1] * 4  # BOS, then 11 text tokens
    assert 1 not in with_bos[:, 1:].tolist() and 3 not in with_bos.tolist()  # '<unk>' stayed text
    plain = sample_calibration(_bos_tokenizer(False, unk=True), 4, 12, seed=0, text_file=f)
    assert plain.shape == (4, 12) and 1 not in plain.tolist()
    with pytest.raises(DataError, match="does not exist"):
        sample_calibration(_bos_tokenizer(False), 4, 12, text_file=tmp_path / "missing.txt")


def test_cli_evaluates_and_calibrates_on_a_users_text(tmp_path, capsys):
    import json

    from quantpredict.cli import main

    f = tmp_path / "mine.txt"
    f.write_text("The cat sat on the mat, and the dog sat by the door. " * 300, encoding="utf-8")
    assert main(["eval", "llama-xs", "--eval-text", str(f), "--max-windows", "2", "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == 2 and res["source"] == f"file:mine.txt#{data.read_text_file(f)[1]}"
    assert res["ppl"] > 0
    # the same text as calibration: the features run on it under the same protocol
    assert main(["features", "llama-xs", "--format", "mxint4", "--which", "model,format,noise", "--calib-text",
                 str(f), "--n-windows", "2", "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "mxint4-rtn"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["eval", "llama-xs", "--eval-text", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt does not exist" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
