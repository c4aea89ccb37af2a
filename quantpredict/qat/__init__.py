"""Quantization-aware fine-tuning (QAT): the method alone (``quantpredict.qat``).

The PTQ-vs-QAT study that measures it (``quantpredict study ptq-vs-qat``, ``reports/qat.md``) is in
:mod:`quantpredict.studies`.

- :func:`finetune` -> :class:`QATResult`: STE fake quantization of the layers PTQ quantizes, AdamW on the global
  NLL, on exactly GPTQ's calibration windows, initialised from RTN or GPTQ; :class:`QATConfig` holds its training
  hyper-parameters (steps, learning rate, batch size, init, ...) as one checked value.
- :mod:`.trajectory`: the local objective (summed layer-output error) and the global NLL along a path:
  :func:`ptq_trajectory` (GPTQ/RTN layer by layer), :func:`measure_point` (any model, e.g. QAT every few steps).
- :mod:`.runs`: QAT as run-store methods ``qat`` (from RTN) and ``qat_gptq`` (from GPTQ); :func:`run_qat` (in
  :mod:`.finetune`) carries a QAT recipe out.
- :mod:`.ste`: straight-through-estimator (STE) fake quantization of weights and activations, which
  :func:`finetune` trains through.
"""

from __future__ import annotations

from quantpredict.qat.finetune import INITS, QATConfig, QATResult, finetune, run_qat
from quantpredict.qat.runs import QAT_METHODS, init_of, is_qat_method, method_of, qat_label
from quantpredict.qat.ste import WeightSTE, activation_ste, attach_weight_ste, detach_weight_ste
from quantpredict.qat.trajectory import (
    Reference,
    TrajectoryPoint,
    fp_reference,
    local_objective,
    mean_nll,
    measure_point,
    ptq_trajectory,
    weight_distance,
)

__all__ = [
    "INITS", "QAT_METHODS", "QATConfig", "QATResult", "Reference", "TrajectoryPoint", "WeightSTE", "activation_ste",
    "attach_weight_ste", "detach_weight_ste", "finetune", "fp_reference", "init_of", "is_qat_method",
    "local_objective", "mean_nll", "measure_point", "method_of", "ptq_trajectory", "qat_label", "run_qat",
    "weight_distance",
]
