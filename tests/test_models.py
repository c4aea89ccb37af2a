import json

import pytest
import torch

from quantpredict import models
from quantpredict.cli import main
from quantpredict.errors import ModelError


def test_load_local_hf_dir(tiny_hf_dir):
    model, tok = models.load(tiny_hf_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    model16, _ = models.load(tiny_hf_dir, dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_hub_id_gives_offline_hint():
    with pytest.raises(ModelError, match="never downloads"):
        models.load("facebook/opt-125m")


def test_missing_path_and_non_model_dir(tmp_path):
    with pytest.raises(ModelError, match="tried the zoo"):
        models.load(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelError, match="not a causal language model"):
        models.load(tmp_path)


def test_zoo_listing_sorted_by_size():
    names = models.list_zoo()
    sizes = [models.zoo_card(n)["n_params_nonembed"] for n in names]
    assert sizes == sorted(sizes)


def test_zoo_specs_span_families_and_sizes():
    from quantpredict.models.zoo import zoo_specs

    specs = zoo_specs()
    fams = {s.family for s in specs}
    assert fams >= {"llama", "opt", "gpt2"}
    for fam in fams:
        n = [s.hidden**2 * s.layers for s in specs if s.family == fam]
        assert len(n) >= 4 and max(n) / min(n) >= 10


def test_zoo_list_cli(capsys):
    rc = main(["zoo", "list"])
    out = capsys.readouterr().out
    if models.list_zoo():
        assert rc == 0 and "family" in out
    else:
        assert rc == 1 and "zoo build" in out


def test_zoo_training_resumes_to_the_same_weights(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from quantpredict.models.zoo import BATCH, SEQ_LEN, ZooSpec, train_model

    spec = ZooSpec("tiny-llama", "llama", hidden=32, layers=1, tokens=6 * BATCH * SEQ_LEN, snapshots=(0.5,))
    ids = torch.randint(0, len(tokenizer), (20_000,), generator=torch.Generator().manual_seed(0))
    train_model(spec, tokenizer, ids, ckpt_dir=tmp_path / "a_ckpt", out_root=tmp_path / "a", ckpt_every=2)
    train_model(spec, tokenizer, ids, ckpt_dir=tmp_path / "b_ckpt", out_root=tmp_path / "b", ckpt_every=2,
                stop_after=4)
    assert not (tmp_path / "b" / "tiny-llama").exists()
    train_model(spec, tokenizer, ids, ckpt_dir=tmp_path / "b_ckpt", out_root=tmp_path / "b", ckpt_every=2)
    a = load_file(tmp_path / "a" / "tiny-llama" / "model.safetensors")
    b = load_file(tmp_path / "b" / "tiny-llama" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same data order and optimizer state: bit-identical
    card = json.loads((tmp_path / "a" / "tiny-llama-t50" / "zoo_card.json").read_text())
    assert card["tokens_trained"] == 3 * BATCH * SEQ_LEN and card["snapshot_of"] == "tiny-llama"
    model, _ = models.load(tmp_path / "a" / "tiny-llama")
    assert model.config.model_type == "llama"


def test_shipped_zoo_models_are_real():
    """Within each family test perplexity falls with size, and every model beats a unigram model by far."""
    from quantpredict.data import token_ids

    names = [n for n in models.list_zoo()
             if models.zoo_card(n).get("snapshot_of") is None and models.zoo_card(n).get("long_run_of") is None]
    if len(names) < 12:
        pytest.skip("the zoo is not built in this checkout")
    cards = [models.zoo_card(n) for n in names]
    for fam in {c["family"] for c in cards}:
        ppl = [c["test_ppl"] for c in sorted(cards, key=lambda c: c["n_params_nonembed"]) if c["family"] == fam]
        assert len(ppl) >= 4 and all(a > b for a, b in zip(ppl, ppl[1:])), (fam, ppl)
    _, tok = models.load(names[0])
    valid, test = token_ids(tok, "wikitext2", "valid"), token_ids(tok, "wikitext2", "test")
    counts = torch.bincount(valid, minlength=len(tok)).double() + 1
    unigram_ppl = torch.exp(-torch.log(counts / counts.sum())[test].mean()).item()
    assert max(c["test_ppl"] for c in cards) < unigram_ppl / 3


def test_long_training_resumes_to_the_same_checkpoints(tmp_path, tokenizer, monkeypatch):
    """A long run killed in its stable phase and again inside a cooldown branch resumes to bit-identical
    checkpoints, and every budget's card carries its tokens per parameter."""
    from safetensors.torch import load_file

    from quantpredict.models import zoo

    spec = zoo.ZooSpec("tiny-llama", "llama", hidden=32, layers=1, tokens=6 * zoo.BATCH * zoo.SEQ_LEN)
    ids = torch.randint(0, len(tokenizer), (40_000,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(zoo, "zoo_specs", lambda: [spec])
    monkeypatch.setattr(zoo, "long_corpus_ids", lambda tok: (ids, {"random": ids.numel()}))
    run = zoo.LongRun("tiny-llama", (1, 3))
    kw = dict(ckpt_every=2, evaluate=False)
    assert zoo.train_long(run, tokenizer, ckpt_dir=tmp_path / "a_ckpt", out_root=tmp_path / "a", **kw) == \
        ["tiny-llama-d1", "tiny-llama-d3"]

    real_steps, calls = zoo._train_steps, {"n": 0}

    def killed(model, opt, spec_, ids_, first, last, lr_of, *, bar, on_step=None):
        def step_then_maybe_die(k):
            if on_step is not None:
                on_step(k)
            calls["n"] += 1
            if calls["n"] in (5, 11):  # once in a stable phase, once inside a cooldown branch
                raise KeyboardInterrupt
        return real_steps(model, opt, spec_, ids_, first, last, lr_of, bar=bar, on_step=step_then_maybe_die)

    monkeypatch.setattr(zoo, "_train_steps", killed)
    for _ in range(3):
        try:
            zoo.train_long(run, tokenizer, ckpt_dir=tmp_path / "b_ckpt", out_root=tmp_path / "b", **kw)
            break
        except KeyboardInterrupt:
            continue
    for name, tpp in (("tiny-llama-d1", 1), ("tiny-llama-d3", 3)):
        a = load_file(tmp_path / "a" / name / "model.safetensors")
        b = load_file(tmp_path / "b" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        card = json.loads((tmp_path / "b" / name / "zoo_card.json").read_text())
        assert card["long_run_of"] == "tiny-llama" and card["tokens_per_param"] == pytest.approx(tpp, rel=0.2)
    assert calls["n"] > 11  # both kills happened
