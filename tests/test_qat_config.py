"""QATConfig: finetune's training hyper-parameters as one checked value, the same run as the keyword form."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from quantpredict.qat import QATConfig, finetune
from quantpredict.quantize import Recipe


def _windows(n=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


def test_finetune_takes_the_config_and_at_most_ten_parameters():
    params = inspect.signature(finetune).parameters
    assert params["config"].default is None and params["config"].kind is inspect.Parameter.KEYWORD_ONLY
    assert len(params) <= 10
    assert not {f.name for f in dataclasses.fields(QATConfig)} & set(params)  # the fields live in the config alone


def test_finetune_keywords_are_deprecated_and_unknown_ones_rejected():
    model, recipe = tiny_model("llama"), Recipe("int4", calib_samples=4, calib_seq_len=16)
    with pytest.warns(DeprecationWarning, match=r"finetune\(steps=\) is deprecated"):
        finetune(copy.deepcopy(model), recipe, _windows(), steps=0, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'step'"):
        finetune(model, recipe, _windows(), step=1, progress=False)


@pytest.mark.parametrize("bad", [dict(init="awq"), dict(steps=-1), dict(batch_size=0), dict(lr=0.0),
                                 dict(lr=math.nan), dict(track_every=-1), dict(micro_batch_size=0)])
def test_config_rejects_what_finetune_rejects_with_the_same_message(bad):
    with pytest.raises(ValueError) as from_config:
        QATConfig(**bad)
    with pytest.raises(ValueError) as from_keywords:
        finetune(tiny_model("llama"), Recipe("int4"), _windows(), progress=False, **bad)
    assert str(from_config.value) == str(from_keywords.value)
    assert ("unknown QAT init" if "init" in bad else "need steps >= 0") in str(from_config.value)


def test_config_is_frozen_and_replaceable():
    cfg = QATConfig(steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 4
    assert dataclasses.replace(cfg, lr=2e-3) == QATConfig(steps=3, lr=2e-3)
    with pytest.raises(ValueError, match="need steps"):
        dataclasses.replace(cfg, steps=-2)


def test_finetune_with_a_config_is_finetune_with_the_keywords():
    fp = tiny_model("llama", seed=1)
    recipe = Recipe("int4", calib_samples=8, calib_seq_len=16)
    keywords = dict(steps=4, lr=1e-2, batch_size=3, init="gptq", seed=2, weight_decay=0.01, grad_clip=0.5,
                    eval_windows=4, track_every=2, micro_batch_size=2)
    m_kw, m_cfg = copy.deepcopy(fp), copy.deepcopy(fp)
    a = finetune(m_kw, recipe, _windows(), progress=False, **keywords)
    b = finetune(m_cfg, recipe, _windows(), progress=False, config=QATConfig(**keywords))
    assert a.losses == b.losses and len(a.losses) == 4
    assert [p.to_dict() for p in a.trajectory] == [p.to_dict() for p in b.trajectory]
    for k in ("init", "steps", "lr", "batch_size", "seed", "calib_nll_before", "calib_nll_after", "start_mismatch",
              "changed_fraction", "label"):
        assert getattr(a, k) == getattr(b, k), k
    for (name, w), (_, v) in zip(m_kw.state_dict().items(), m_cfg.state_dict().items()):
        assert torch.equal(w, v), name


def test_finetune_config_and_keywords_must_agree():
    model, recipe = tiny_model("llama"), Recipe("int4", calib_samples=4, calib_seq_len=16)
    cfg = QATConfig(steps=1, lr=1e-2, batch_size=2)
    with pytest.raises(ValueError, match=r"conflicting keyword\(s\): steps=3 \(config: 1\)"):
        finetune(model, recipe, _windows(), config=cfg, steps=3, progress=False)
    with pytest.raises(TypeError, match="QATConfig"):
        finetune(model, recipe, _windows(), config={"steps": 1}, progress=False)
    res = finetune(model, recipe, _windows(), config=cfg, lr=1e-2, progress=False)  # repeating a value is fine
    assert (res.steps, res.lr, res.batch_size) == (1, 1e-2, 2)


def test_config_from_a_qat_recipe_and_from_study_settings():
    from quantpredict.studies.study import StudySettings

    recipe = Recipe("int4", method="gptq", qat=True, qat_steps=7, qat_lr=2e-3, qat_batch_size=2, seed=5)
    assert QATConfig.from_recipe(recipe) == QATConfig(steps=7, lr=2e-3, batch_size=2, init="gptq", seed=5)
    assert QATConfig.from_recipe(recipe, micro_batch_size=1).micro_batch_size == 1
    s = StudySettings(steps=5, lr=3e-3, batch_size=2, eval_windows=4, track_every=1, seed=9)
    assert s.qat_config("rtn", micro_batch_size=2) == QATConfig(steps=5, lr=3e-3, batch_size=2, init="rtn", seed=9,
                                                                eval_windows=4, track_every=1, micro_batch_size=2)
