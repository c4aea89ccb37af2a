"""The shipped predictors, by name and folder, and :func:`resolve_predictor` (a name, a folder or an instance to a
predictor): one place that ``predict_quality``, ``rank_recipes`` and ``allocate`` read, below all three."""

from __future__ import annotations

from pathlib import Path

from quantpredict.data import DATA_DIR, data_dir
from quantpredict.errors import PredictorError
from quantpredict.predict.saved import SavedPredictor

#: the shipped ``physics`` predictor (the folder keeps its historical name "default"; it was the default predictor
#: until the weights-only ``profile`` one, :data:`PROFILE_PREDICTOR_DIR`, became it), in the data folder (the
#: checkout's, or $QUANTPREDICT_DATA). ``resolve_predictor("physics")`` names it.
DEFAULT_PREDICTOR_DIR = DATA_DIR / "predictors" / "default"
PHYSICS_PREDICTOR_DIR = DEFAULT_PREDICTOR_DIR
#: the default predictor: kind ``profile``, priced from the weights (``resolve_predictor("default")``)
PROFILE_PREDICTOR_DIR = DATA_DIR / "predictors" / "profile"
#: the stores the shipped predictors are fitted on (docs/studies.md): the zoo, the long-trained checkpoints, SmolLM2,
#: the other formats and the per-class runs; the 1.5B model's store is kept out, to judge them on a model never seen
SHIPPED_STORES = ("runs.sqlite", "long.sqlite", "smollm2.sqlite", "formats.sqlite", "alloc.sqlite", "classes.sqlite")
#: the shipped predictors by name
SHIPPED = {"default": ("profile", "PROFILE_PREDICTOR_DIR"), "profile": ("profile", "PROFILE_PREDICTOR_DIR"),
           "physics": ("physics", "PHYSICS_PREDICTOR_DIR")}


def resolve_predictor(predictor: str | Path | SavedPredictor) -> SavedPredictor:
    """A predictor instance (any :class:`~quantpredict.predict.saved.SavedPredictor`), a shipped one by name
    (``"default"`` or ``"profile"``: the weights-only ``profile`` predictor in ``data/predictors/profile``;
    ``"physics"``: the measurement predictor in ``data/predictors/default``) or a saved predictor's directory."""
    if isinstance(predictor, SavedPredictor):
        return predictor
    shipped = SHIPPED.get(str(predictor))
    # read from the module's globals at call time (not bound at definition): a test can point them elsewhere
    path = globals()[shipped[1]] if shipped else Path(predictor)
    if path.is_relative_to(DATA_DIR):
        data_dir()  # a shipped predictor: no data folder is the error naming $QUANTPREDICT_DATA
    if shipped and not (path / "predictor.json").is_file():
        runs = DATA_DIR / "runs"
        raise PredictorError(
            f"no {predictor} predictor at {path}; fit one on the shipped runs with `quantpredict fit "
            f"--store {' '.join(str(runs / s) for s in SHIPPED_STORES)} --kind {shipped[0]} --out {path}`, or pass "
            "--predictor DIR")
    return SavedPredictor.load(path)
