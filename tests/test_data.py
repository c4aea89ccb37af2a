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
    ids = data.token_ids(a, "wikitext2", "valid")
    assert data.token_ids(b, "wikitext2", "valid") is ids  # same content: one tokenization
    assert ids.dtype == torch.long and ids.numel() > 100_000
    assert ids[:50].tolist() == a(data.load_text("wikitext2", "valid")[:2000], add_special_tokens=False)[
        "input_ids"][:50]
