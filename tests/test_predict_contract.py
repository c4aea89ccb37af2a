"""The predictor contract (quantpredict.predict.saved.SavedPredictor): one base class saves, loads by kind, records
validation and describes every predictor; the kinds table names each kind's class and why the kind stays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantpredict.errors import PredictorError
from quantpredict.predict import (
    DEFAULT_PREDICTOR_DIR,
    KIND_ROLES,
    KINDS,
    PHYSICS_KINDS,
    PhysicsPredictor,
    Predictor,
    SavedPredictor,
)
from quantpredict.predict.quality import resolve_predictor

SHIPPED = DEFAULT_PREDICTOR_DIR.parent


def test_every_kind_has_a_role_and_one_class():
    registry = SavedPredictor.registry()
    assert set(registry) == set(KIND_ROLES) == set(KINDS) | set(PHYSICS_KINDS)
    assert {registry[k] for k in KINDS} == {Predictor} and {registry[k] for k in PHYSICS_KINDS} == {PhysicsPredictor}
    assert all(role.strip() for role in KIND_ROLES.values())


def test_the_base_alone_saves_loads_and_records_validation():
    for cls in (Predictor, PhysicsPredictor):
        for name in ("save", "load", "attach_validation", "describe", "_check_fitted"):
            assert name not in vars(cls), f"{cls.__name__} redefines {name}"


def test_a_kind_without_a_role_cannot_register():
    with pytest.raises(TypeError, match="KIND_ROLES"):
        type("Stray", (SavedPredictor,), {}, kinds=("stray",))
    assert "stray" not in SavedPredictor.registry()


@pytest.mark.parametrize("name", ["default", "profile", "gbm"])
def test_load_by_kind_from_any_class(name):
    d = SHIPPED / name
    kind = json.loads((d / "predictor.json").read_text())["kind"]
    for cls in (SavedPredictor, Predictor, PhysicsPredictor):
        p = cls.load(d)
        assert type(p) is SavedPredictor.registry()[kind] and p.kind == kind
    assert isinstance(resolve_predictor(p), SavedPredictor) and resolve_predictor(p) is p


def test_validation_and_describe_survive_a_round_trip(tmp_path):
    p = SavedPredictor.load(DEFAULT_PREDICTOR_DIR)
    p.attach_validation([{"split": "family", "kind": p.kind, "kld_median_rel_err": np.float64(0.04),
                          "n_runs": np.int64(12)}])
    back = SavedPredictor.load(p.save(tmp_path / "p"))
    assert back.metadata["validation"] == [{"split": "family", "kind": p.kind, "kld_median_rel_err": 0.04,
                                            "n_runs": 12}]
    d = back.describe()
    assert d["kind"] == "physics" and d["role"] == KIND_ROLES["physics"] and d["class"] == "PhysicsPredictor"
    assert d["fitted"] and d["features"] == list(back.features) and d["n_runs"] == p.metadata["n_runs"]
    assert d["validation"] == back.metadata["validation"]
    json.dumps(d)  # plain JSON values


@pytest.mark.parametrize("make", [lambda: Predictor("ols"), lambda: PhysicsPredictor("profile")])
def test_unfitted_predictors_describe_themselves_and_refuse_to_save(make, tmp_path):
    p = make()
    d = p.describe()
    assert not d["fitted"] and d["features"] == [] and d["role"] == KIND_ROLES[p.kind]
    with pytest.raises(PredictorError, match="not fitted"):
        p.save(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_an_unknown_saved_kind_is_a_clear_error(tmp_path):
    meta = json.loads((DEFAULT_PREDICTOR_DIR / "predictor.json").read_text())
    meta["kind"] = "svm"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="kind 'svm'.*does not know.*physics"):
        SavedPredictor.load(tmp_path / "p")
    meta["kind"] = "profile"  # a physics predictor's file without its laws
    del meta["laws"]
    (tmp_path / "p" / "predictor.json").write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="incomplete or corrupt.*laws.*quantpredict fit"):
        SavedPredictor.load(tmp_path / "p")
