"""The lean sensitivity profile and its cache: the lean measurement keeps the full one's token-wise terms exactly,
the block-by-block input moments equal a float64 recomputation (and measure_profile's) to float32 accumulation
error, a cached profile prices bit for bit as a fresh one, a warm one runs no backward pass, and a corrupt entry is
measured again with a warning."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from conftest import tiny_model

from quantpredict import arch
from quantpredict.features.fisher import SensitivityProfile, measure_profile, price_deltas, profile_deltas
from quantpredict.features.moments import InputMoments, LazyInputMoments, measure_input_moments
from quantpredict.predict import profile_cache
from quantpredict.predict.profile_cache import ProfileCacheWarning
from quantpredict.recipe import Recipe

U32 = 2.0 ** -24  # float32 unit roundoff


def _windows(n=3, L=16, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, L), generator=g)


@functools.lru_cache(maxsize=1)
def _zoo_calib() -> torch.Tensor:
    """A short 1-D stream of llama-xs token ids (WikiText-2 test's first characters; no whole-split tokenizing)."""
    from quantpredict import data, models

    _, tok = models.load("llama-xs")
    text = data.load_text("wikitext2", "test")[:20_000]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _profile(cache=True, **kw):
    from quantpredict.predict.rank import profile_model

    return profile_model("llama-xs", calib=_zoo_calib(), n_windows=3, seq_len=64, cache=cache, **kw)


def _float64_moments(model, windows):
    """Every linear's ``E[x x^T]`` in float64 from the inputs of a plain forward pass, one window at a time, and
    ``E[|x| |x|^T]`` (for the rounding bound)."""
    refs = arch.linear_layers(model)
    xs: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}
    with torch.no_grad(), arch.input_hooks(refs, lambda ref, x: xs[ref.name].append(x.reshape(-1, x.shape[-1]))):
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    out = {}
    for name, parts in xs.items():
        x = torch.cat(parts).double()
        out[name] = (x.T @ x / x.shape[0], x.abs().T @ x.abs() / x.shape[0])
    return out


def _nan_equal(d: dict) -> dict:
    """``d`` with NaN floats as a string, so that equal dicts compare equal (bit for bit on the other floats)."""
    return {k: "nan" if isinstance(v, float) and v != v else v for k, v in d.items()}


def _row(mp, recipe):
    from quantpredict.predict.rank import recipe_row

    return _nan_equal({k: v for k, v in recipe_row(mp, recipe).items() if k != "price_seconds"})


# ---- the lean measurement -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lean_profile_keeps_the_token_terms_exactly_and_allocates_no_factor(family):
    model = tiny_model(family)
    win = _windows(4)
    full = measure_profile(model, win, seed=0, token_windows=2)
    lean = measure_profile(model, win, seed=0, token_windows=2, kfac=False)
    assert lean.output_fisher == {}
    assert isinstance(lean.input_moment, LazyInputMoments) and not lean.input_moment.measured
    assert (lean.fp_nll, lean.fp_entropy, lean.tokens) == (full.fp_nll, full.fp_entropy, full.tokens)
    for n in full.names:
        assert torch.equal(lean.token_inputs[n], full.token_inputs[n])
        assert torch.equal(lean.token_grads[n], full.token_grads[n])
    refs = arch.linear_layers(model)
    deltas = profile_deltas(refs, [("int4", None)] * len(refs), "rtn", lean)
    assert _nan_equal(price_deltas(lean, full.names, deltas, kfac=False)) == _nan_equal(
        price_deltas(full, full.names, deltas, kfac=False))
    with pytest.raises(ValueError, match="lean"):
        price_deltas(lean, full.names, deltas)  # K-FAC prices need G


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox"])
def test_block_by_block_moments_equal_a_float64_recomputation_and_measure_profile(family, tmp_path):
    model = tiny_model(family)
    win = _windows(3, 24)
    moments = measure_input_moments(model, win, directory=tmp_path / "m")
    assert isinstance(moments, InputMoments) and set(moments) == {r.name for r in arch.linear_layers(model)}
    today = measure_profile(model, win, seed=0).input_moment
    ref = _float64_moments(model, win)
    n_tokens = win.numel()
    for name, (a64, abs64) in ref.items():
        # float32 products of one window's tokens summed, then the windows' sums: gamma_(L + n) |x||x|^T / N
        bound = (win.shape[1] + win.shape[0] + 2) * U32 * abs64 + 1e-30
        for got in (moments[name], today[name]):
            assert got.dtype == torch.float32 and got.shape == a64.shape
            assert ((got.double() - a64).abs() <= bound).all(), name
        assert ((moments[name].double() - today[name].double()).abs() <= 2 * bound).all(), name
    assert moments.tokens == n_tokens
    # the lazy moments of a lean profile are the same, and GPTQ's Hessian is 2A
    lean = measure_profile(model, win, seed=0, kfac=False)
    name = arch.linear_layers(model)[0].name
    assert torch.equal(lean.input_moment[name], moments[name]) and lean.input_moment.measured
    torch.testing.assert_close(lean.hessian(name), 2.0 * moments[name].double(), rtol=0, atol=0)


def test_moments_directory_is_written_atomically_and_checked(tmp_path):
    from quantpredict.features.moments import CorruptMomentsError

    model = tiny_model("llama")
    d = tmp_path / "m"
    measure_input_moments(model, _windows(2), directory=d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    again = measure_input_moments(model, _windows(2), directory=d)  # one there already (another process's): kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and len(again) == len(arch.linear_layers(model))
    f = d / "block_0001.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CorruptMomentsError, match=re.escape(str(f))):
        InputMoments(d)


# ---- the cache ------------------------------------------------------------------------------------------------------


def test_cached_profile_prices_bit_for_bit_as_a_fresh_one():
    recipes = [Recipe("int4"), Recipe("mxint3"), Recipe("mxint4", method="gptq")]
    fresh = _profile(cache=False)
    assert fresh.cache_dir is None and not fresh.cached
    cold = _profile()
    assert cold.cache_dir is not None and not cold.cached
    assert cold.cache_dir.parent == profile_cache.profiles_root() and cold.cache_dir.name.startswith("llama-xs-")
    rows_fresh = [_row(fresh, r) for r in recipes]
    rows_cold = [_row(cold, r) for r in recipes]  # the GPTQ one writes its calibration's moments into the entry
    assert (cold.cache_dir / "moments-128x256-seed0" / "index.json").is_file()
    cold.profile.input_moment["model.layers.0.self_attn.q_proj"]  # the profile's own moments, kept beside them
    warm = _profile()
    assert warm.cached and warm.cache_dir == cold.cache_dir
    assert isinstance(warm.profile.input_moment, InputMoments)
    rows_warm = [_row(warm, r) for r in recipes]
    assert isinstance(warm.calibration_moments[(128, 256, 0)], InputMoments)  # read, not measured again
    assert rows_fresh == rows_cold == rows_warm
    assert warm.model_features == fresh.model_features
    assert warm.full_split_windows == cold.full_split_windows
    for n in fresh.profile.names:
        assert torch.equal(warm.profile.token_inputs[n], fresh.profile.token_inputs[n])
        assert torch.equal(warm.profile.token_grads[n], fresh.profile.token_grads[n])
        assert torch.equal(warm.profile.input_moment[n], fresh.profile.input_moment[n])


def test_warm_profile_runs_no_backward_and_no_measurement(monkeypatch):
    _profile()  # measured (or already cached by another test)

    def forbidden(*a, **k):
        raise AssertionError("a warm profile must not measure")

    import quantpredict.features.fisher as fisher

    monkeypatch.setattr(fisher, "measure_profile", forbidden)
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    warm = _profile()
    assert warm.cached
    assert _row(warm, Recipe("int4"))["token_gn_quad"] > 0


def test_warm_profile_measures_the_input_moments_on_its_cached_windows(monkeypatch):
    import importlib
    import shutil

    extract = importlib.import_module("quantpredict.features.extract")  # the module, not the function it exports
    fresh = _profile(cache=False)
    entry = _profile().cache_dir
    shutil.rmtree(entry / "moments", ignore_errors=True)

    def forbidden(*a, **k):
        raise AssertionError("the cached windows are used, the calibration text is not cut again")

    monkeypatch.setattr(extract, "feature_windows", forbidden)
    warm = _profile()
    assert warm.cached and isinstance(warm.profile.input_moment, LazyInputMoments)
    for n in fresh.profile.names:
        assert torch.equal(warm.profile.input_moment[n], fresh.profile.input_moment[n])
    assert (entry / "moments" / "index.json").is_file()


def test_gptq_is_priced_with_the_hessians_quantize_model_calibrates_on():
    """The price's GPTQ Hessians are those of the recipe's own calibration windows, cut as quantize_model cuts them:
    equal (to float32 accumulation) to quantize.calib.collect_hessians of the FP model on those windows, which is
    the Hessian quantize_model's GPTQ rounds the first block against, and not the profile's 3 windows'."""
    from quantpredict.data import calibration_windows
    from quantpredict.quantize.calib import collect_hessians

    mp = _profile(cache=False)
    recipe = Recipe.from_label("int4-gptq-cal16x64-seed3")
    hessians = mp.calibration_hessians(recipe)
    windows = calibration_windows(_zoo_calib(), 16, 64, seed=3)
    with torch.no_grad():
        ref = collect_hessians(mp.model, windows)  # float64 accumulation of float32 products
    for r in mp.refs:
        h = ref[r.name]
        got = hessians[r.name]
        assert got.dtype == torch.float64 and got.shape == h.shape
        assert (got - h).abs().max() <= 1e-5 * h.abs().max(), r.name
    assert hessians.moments.load().tokens == 16 * 64
    name = mp.refs[0].name
    assert not torch.allclose(hessians[name], mp.profile.hessian(name), rtol=1e-3)  # not the profile's windows


def test_the_key_follows_weights_calibration_protocol_and_code(monkeypatch):
    model = tiny_model("llama")
    ids = _windows(1, 400)[0]
    base = dict(model_or_path=model, model=model, tokenizer=None, calib=ids)
    proto = {"n_windows": 2, "seq_len": 16, "seed": 0}
    key = profile_cache.cache_key(profile_cache.key_parts(**base, protocol=proto))
    assert key == profile_cache.cache_key(profile_cache.key_parts(**base, protocol=dict(proto)))
    assert key != profile_cache.cache_key(profile_cache.key_parts(**base, protocol=proto | {"seed": 1}))
    other = dict(base, calib=ids.flip(0))
    assert key != profile_cache.cache_key(profile_cache.key_parts(**other, protocol=proto))
    with torch.no_grad():
        arch.linear_layers(model)[0].weight[0, 0] += 1e-3
    assert key != profile_cache.cache_key(profile_cache.key_parts(**base, protocol=proto))
    with torch.no_grad():
        arch.linear_layers(model)[0].weight[0, 0] -= 1e-3
    monkeypatch.setattr(profile_cache, "PROFILE_VERSION", profile_cache.PROFILE_VERSION + 1)
    assert key != profile_cache.cache_key(profile_cache.key_parts(**base, protocol=proto))


def test_profiles_live_beside_the_imported_models(monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTPREDICT_PROFILES", raising=False)
    monkeypatch.setenv("QUANTPREDICT_HOME", str(tmp_path))
    assert profile_cache.profiles_root() == tmp_path / "profiles"


@pytest.mark.parametrize("damage", ["truncate_tokens", "garbage_json", "no_json", "wrong_key", "truncate_moments"])
def test_a_corrupt_entry_is_measured_again_with_a_warning(damage):
    first = _profile()
    entry = first.cache_dir
    recipes = (Recipe("int4"), Recipe("int4", method="gptq"))
    expected = [_row(first, r) for r in recipes]  # the GPTQ one measures (or reads) its calibration's moments
    if damage == "truncate_tokens":
        f = entry / "tokens.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage_json":
        (entry / "profile.json").write_text("{not json")
    elif damage == "no_json":
        (entry / "profile.json").unlink()
    elif damage == "wrong_key":
        doc = json.loads((entry / "profile.json").read_text())
        (entry / "profile.json").write_text(json.dumps(doc | {"key": "0" * 64}))
    else:
        f = entry / "moments-128x256-seed0" / "block_0000.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(ProfileCacheWarning, match=re.escape(str(entry))):
        again = _profile()
        rows = [_row(again, r) for r in recipes]  # the moments are read (and found corrupt) when GPTQ needs them
    assert again.cache_dir == entry
    assert again.cached == (damage == "truncate_moments")  # only the moments were lost: measured on demand
    assert rows == expected
    assert _profile().cached  # written back whole


def test_an_unwritable_cache_warns_and_still_profiles(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QUANTPREDICT_PROFILES", str(blocker / "profiles"))
    with pytest.warns(ProfileCacheWarning, match="could not write"):
        mp = _profile()
    assert mp.cache_dir is None and not mp.cached
    assert _row(mp, Recipe("int4", method="gptq"))["token_gn_quad"] > 0  # moments in a temporary folder


def test_profile_command_measures_then_reports_the_cache(monkeypatch, capsys):
    import quantpredict.predict.rank as rank
    from quantpredict.cli import main

    monkeypatch.setattr(rank, "profile_model", functools.partial(rank.profile_model, calib=_zoo_calib(),
                                                                 n_windows=3, seq_len=64))
    assert main(["profile", "llama-xs", "--no-cache", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] is None and not doc["cached"] and not doc["input_moments"]
    assert main(["profile", "llama-xs", "--gptq", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ input moments (its default calibration, 128 windows" in out and "MiB" in out
    assert "FP calibration NLL" in out
    assert main(["profile", "llama-xs", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cached"] and doc["input_moments"] and doc["bytes"] > doc["input_moments_bytes"] > 0
    assert doc["path"].endswith(doc["key"]) and len(doc["key"]) == 16
    assert doc["fp_calib_nll"] == pytest.approx(rank.profile_model("llama-xs").profile.fp_nll, abs=0)


def test_sensitivity_profile_takes_a_plain_dict_as_before():
    p = SensitivityProfile(names=["a"], input_moment={"a": torch.eye(2)}, output_fisher={}, tokens=1, fp_nll=0.0,
                           fp_entropy=0.0, seconds=0.0)
    torch.testing.assert_close(p.hessian("a"), 2 * torch.eye(2, dtype=torch.float64))


def test_streamed_safetensors_files_read_back_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from quantpredict.features.moments import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, generator=g, dtype=torch.float64).t(), "ids": torch.arange(9).reshape(3, 3),
               "empty": torch.zeros(0, 4)}
    size = write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "x"})
    assert size == (tmp_path / "t.safetensors").stat().st_size
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "x"}


def test_the_weights_hash_is_remembered_by_path_size_and_mtime(monkeypatch, tmp_path):
    import os

    import quantpredict.runs.identity as identity

    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    first = profile_cache.files_hash(d)
    assert first == identity.weights_hash(d, n=16)

    def forbidden(*a, **k):
        raise AssertionError("remembered, not read again")

    monkeypatch.setattr(identity, "weights_hash", forbidden)
    assert profile_cache.files_hash(d) == first
    monkeypatch.undo()
    (d / "model.safetensors").write_bytes(b"other w")  # same size, new bytes and mtime
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert profile_cache.files_hash(d) == identity.weights_hash(d, n=16) != first
