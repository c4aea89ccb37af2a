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


@pytest.mark.recorded
def test_shipped_zoo_models_are_real():
    """Within each family test perplexity falls with size, and every model beats a unigram model by far.

    The perplexities are the zoo cards' recorded ones (float32 evaluations on the machine that built the zoo): they are
    ordered among themselves, with no recomputation, and held against the unigram perplexity computed here in float64
    with a factor of 3 between them; float32 rounding moves a perplexity by ~1e-6 relative, so no CPU changes this."""
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


def _tiny_long_setup(monkeypatch, tokenizer, family="llama"):
    from quantpredict.models import zoo

    spec = zoo.ZooSpec("tiny-llama", family, hidden=32, layers=1, tokens=6 * zoo.BATCH * zoo.SEQ_LEN)
    ids = torch.randint(0, len(tokenizer), (40_000,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(zoo, "zoo_specs", lambda: [spec])
    monkeypatch.setattr(zoo, "long_corpus_ids", lambda tok: (ids, {"random": ids.numel()}))
    return zoo, spec, ids


def test_compact_resume_state_round_trips_in_bf16_and_refuses_foreign_files(tmp_path, tokenizer, monkeypatch):
    """The committed resume state holds every weight once (the tied lm_head is re-tied, not stored), loads back
    exactly as the bf16 rounding of the saved weights, and a file of another format or model is refused."""
    from safetensors.torch import load_file, save_file

    zoo, spec, _ = _tiny_long_setup(monkeypatch, tokenizer, family="gpt2")  # gpt2: lm_head tied to wte
    model, _, _, _ = zoo._model_and_optimizer(spec, tokenizer, tmp_path / "none.pt")
    path = tmp_path / "r.resume.safetensors"
    zoo.save_resume_state(model, 1234, 56.7, path)
    stored = load_file(str(path))
    assert len(stored) == len({v.data_ptr() for v in model.state_dict().values()}) < len(model.state_dict())
    fresh, _, _, _ = zoo._model_and_optimizer(zoo.ZooSpec("tiny-llama", "gpt2", 32, 1, 1, seed=7), tokenizer,
                                               tmp_path / "none.pt")
    assert zoo.load_resume_state(fresh, path) == (1234, 56.7)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value.to(torch.bfloat16).float()), key
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    save_file(stored, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a long-run resume state"):
        zoo.load_resume_state(fresh, tmp_path / "plain.safetensors")
    llama, _, _, _ = zoo._model_and_optimizer(zoo.ZooSpec("x", "llama", 32, 1, 1), tokenizer, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        zoo.load_resume_state(llama, path)


def test_reestimated_moments_equal_a_float64_ema_of_the_clipped_gradients(tokenizer, monkeypatch):
    """Re-estimating AdamW's moments leaves the weights bit-identical and gives exactly Adam's two EMAs (betas
    0.9, 0.95) of the norm-clipped gradients of the batches before the resume point, recomputed here in float64."""
    zoo, spec, ids = _tiny_long_setup(monkeypatch, tokenizer)
    monkeypatch.setattr(zoo, "MOMENT_STEPS", 4)
    model, opt, _, _ = zoo._model_and_optimizer(spec, tokenizer, zoo.Path("/nonexistent.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    model.train()
    for step in range(6, 10):  # the 4 batches before step 10
        starts = zoo._batch_starts(spec.seed, step, ids.numel())
        x = torch.stack([ids[s : s + zoo.SEQ_LEN] for s in starts.tolist()])
        model(input_ids=x, labels=x).loss.backward()
        grads = [p.grad.double() for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        scale = min(1.0, 1.0 / (float(norm) + 1e-6))
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g * scale
            v[i] = 0.95 * v[i] + 0.05 * (g * scale) ** 2
        model.zero_grad(set_to_none=True)
    assert zoo.reestimate_moments(model, opt, spec, ids, 10) == 4
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    for i, p in enumerate(params):
        state = opt.state[p]
        assert float(state["step"]) == 4
        torch.testing.assert_close(state["exp_avg"].double(), m[i], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v[i], rtol=1e-4, atol=1e-12)


def test_long_run_resumes_on_a_fresh_clone_from_the_committed_state(tmp_path, tokenizer, monkeypatch):
    """Killed in its stable phase with only the committed compact state left (the .pt files are not committed),
    the long run resumes and ends close to the uninterrupted run: far closer than a resume with fresh (zero) AdamW
    moments, the naive alternative, and a small fraction of the distance between its two checkpoints."""
    from safetensors.torch import load_file

    zoo, spec, _ = _tiny_long_setup(monkeypatch, tokenizer)
    run = zoo.LongRun("tiny-llama", (1, 3))
    kw = dict(ckpt_every=2, evaluate=False)
    zoo.train_long(run, tokenizer, ckpt_dir=tmp_path / "a_ckpt", out_root=tmp_path / "a", **kw)
    real_steps = zoo._train_steps

    def resumed_on_a_fresh_clone(tag: str) -> dict:
        calls = {"n": 0}

        def killed(model, opt, spec_, ids_, first, last, lr_of, *, bar, on_step=None):
            def step_then_maybe_die(k):
                if on_step is not None:
                    on_step(k)
                calls["n"] += 1
                if calls["n"] == 13:  # inside the stable phase towards d3, after d1 was saved
                    raise KeyboardInterrupt
            return real_steps(model, opt, spec_, ids_, first, last, lr_of, bar=bar, on_step=step_then_maybe_die)

        monkeypatch.setattr(zoo, "_train_steps", killed)
        with pytest.raises(KeyboardInterrupt):
            zoo.train_long(run, tokenizer, ckpt_dir=tmp_path / f"{tag}_ckpt", out_root=tmp_path / tag, **kw)
        monkeypatch.setattr(zoo, "_train_steps", real_steps)
        compact = zoo.resume_path(tmp_path / f"{tag}_ckpt", "tiny-llama")
        for pt in (tmp_path / f"{tag}_ckpt").glob("*.pt"):
            pt.unlink()  # a fresh clone: only the committed state survives
        probe = zoo._model_and_optimizer(spec, tokenizer, tmp_path / "none.pt")[0]
        assert 5 < zoo.load_resume_state(probe, compact)[0] <= 12  # past d1's branch point, before d3's
        assert zoo.train_long(run, tokenizer, ckpt_dir=tmp_path / f"{tag}_ckpt", out_root=tmp_path / tag,
                              **kw) == ["tiny-llama-d3"]
        return load_file(tmp_path / tag / "tiny-llama-d3" / "model.safetensors")

    def dist(x, y):
        return torch.sqrt(sum(((x[k].float() - y[k].float()) ** 2).sum() for k in x)).item()

    a = load_file(tmp_path / "a" / "tiny-llama-d3" / "model.safetensors")
    d1 = load_file(tmp_path / "a" / "tiny-llama-d1" / "model.safetensors")
    resumed = resumed_on_a_fresh_clone("b")
    with monkeypatch.context() as m:
        m.setattr(zoo, "reestimate_moments", lambda *args, **kwargs: 0)
        zero_moments = resumed_on_a_fresh_clone("c")
    assert 0 < dist(a, resumed) < 0.5 * dist(a, zero_moments)  # measured: 0.44 vs 1.42
    assert dist(a, resumed) < 0.25 * dist(a, d1)  # measured: 0.44 vs 2.34


def test_long_checkpoints_link_the_shared_tokenizer(tmp_path):
    """A checkpoint's tokenizer.json becomes a relative link to the zoo's when the bytes are equal, else stays."""
    from quantpredict.models import zoo

    shared, own, other = tmp_path / "tokenizer", tmp_path / "m", tmp_path / "n"
    for d, text in ((shared, "{}"), (own, "{}"), (other, '{"x": 1}')):
        d.mkdir()
        (d / "tokenizer.json").write_text(text)
    assert zoo.link_shared_tokenizer(own, shared) and not zoo.link_shared_tokenizer(other, shared)
    assert (own / "tokenizer.json").is_symlink() and (own / "tokenizer.json").read_text() == "{}"
    assert not (own / "tokenizer.json").readlink().is_absolute()
    assert not (other / "tokenizer.json").is_symlink()
    assert not zoo.link_shared_tokenizer(own, shared)  # already a link
