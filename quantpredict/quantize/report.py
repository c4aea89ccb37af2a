"""What a quantization did: one :class:`LayerReport` per quantized linear and the model-level :class:`QuantReport`
(sizes, errors, AWQ's groups), JSON-ready and as a table. It imports neither torch nor transformers, so that both
:func:`~quantpredict.quantize.model.quantize_model` and the checkpoint-only RTN path
(:mod:`quantpredict.quantize.direct`) report through it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantpredict.quantize.awq import AwqClipReport, AwqGroupReport
    from quantpredict.quantize.embeddings import MatrixReport
    from quantpredict.recipe import Recipe

#: the file a saved quantized model records its recipe and report in
QUANT_CONFIG = "quantization.json"


@dataclass(frozen=True)
class LayerReport:
    """One quantized linear layer.

    ``output_error_rtn`` / ``output_error`` are relative squared output errors on the calibration inputs,
    ``||dW X||^2 / ||W X||^2``, for RTN and for the recipe's method (equal for RTN). With AWQ, ``output_error_rtn``
    is plain RTN of the layer as it was (unscaled, unclipped: the baseline AWQ improves on) and ``output_error``
    that of the stored layer against its scaled FP weight on its scaled inputs; both measure the same outputs,
    except for a linear whose output rows AWQ scaled (v, up: that error is of the scaled outputs).
    """

    name: str
    block_index: int
    out_features: int
    in_features: int
    rel_weight_error: float  # ||Q(W) - W||_F / ||W||_F
    output_error_rtn: float
    output_error: float
    seconds: float


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_model` did: per layer errors, and the model's size after quantization.

    Sizes count quantized weights at the format's effective bits (element bits plus shared scales), the embedding
    and head too where the recipe quantizes them, and every other parameter (norms, biases, skipped layers; the
    embedding and head otherwise) at 16 bits; ``compression_ratio`` is against the whole model in bf16.
    """

    recipe_label: str
    layers: tuple[LayerReport, ...]
    quantized_params: int
    total_params: int
    effective_bits_per_param: float  # over the quantized weights, scales included
    model_bits_per_param: float  # over every parameter
    size_bytes: float
    bf16_size_bytes: int
    compression_ratio: float
    calibration_tokens: int
    total_seconds: float
    awq: tuple[AwqGroupReport, ...] = ()  # AWQ's scaling groups, with the scales folded
    awq_clips: tuple[AwqClipReport, ...] = ()  # AWQ's clipping search, per linear
    # False for data-free RTN run without a calibration pass: the layers' output errors are NaN placeholders, and
    # summary / to_dict / format_table say "not measured" (None in JSON) instead of passing the NaNs on
    output_errors_measured: bool = True
    # the token embedding and LM head, where the recipe's embedding_format / head_format quantized them
    matrices: tuple[MatrixReport, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The model-level numbers (no per-layer rows, no AWQ scales), JSON-ready; ``matrices`` (the embedding and
        head, one dict each) only where the recipe quantized them."""
        d = {k: v for k, v in asdict(self).items() if k not in ("layers", "awq", "awq_clips", "matrices")}
        if self.matrices:
            d["matrices"] = [asdict(m) for m in self.matrices]
        d["n_layers"] = len(self.layers)
        if self.layers:
            d["mean_rel_weight_error"] = sum(r.rel_weight_error for r in self.layers) / len(self.layers)
            if self.output_errors_measured:
                d["mean_output_error_rtn"] = sum(r.output_error_rtn for r in self.layers) / len(self.layers)
                d["mean_output_error"] = sum(r.output_error for r in self.layers) / len(self.layers)
            else:
                d["mean_output_error_rtn"] = d["mean_output_error"] = None
        if self.awq:
            d["awq_groups"] = len(self.awq)
            d["awq_mean_ratio"] = sum(g.ratio for g in self.awq) / len(self.awq)
            gains = [g.loss / g.loss_rtn for g in self.awq if g.loss_rtn > 0]
            d["awq_mean_loss_ratio"] = sum(gains) / len(gains) if gains else 1.0
        if self.awq_clips:
            d["awq_clipped_fraction"] = sum(c.clipped_fraction for c in self.awq_clips) / len(self.awq_clips)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["layers"] = [asdict(r) for r in self.layers]
        if not self.output_errors_measured:
            for row in d["layers"]:
                row["output_error_rtn"] = row["output_error"] = None
        d["awq"] = [asdict(g) for g in self.awq]
        d["awq_clips"] = [asdict(c) for c in self.awq_clips]
        return d

    def format_table(self, *, max_rows: int | None = None) -> str:
        """A plain-text table: one row per layer, then the model summary."""
        head = f"{'layer':<44} {'shape':>11} {'rel.w.err':>9} {'out.err RTN':>11} {'out.err':>9} {'sec':>6}"
        lines = [head, "-" * len(head)]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for r in rows:
            name = r.name if len(r.name) <= 44 else "..." + r.name[-41:]
            errs = (f"{r.output_error_rtn:11.3e} {r.output_error:9.3e}" if self.output_errors_measured
                    else f"{'-':>11} {'-':>9}")
            lines.append(f"{name:<44} {f'{r.out_features}x{r.in_features}':>11} {r.rel_weight_error:9.4f} "
                         f"{errs} {r.seconds:6.2f}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        lines.append("-" * len(head))
        s = self.summary()
        lines.append(
            f"{self.recipe_label}: {self.quantized_params:,} of {self.total_params:,} parameters quantized at "
            f"{self.effective_bits_per_param:.3f} bits each (scales included); model {self.size_bytes / 2**20:.2f} "
            f"MiB, {self.compression_ratio:.2f}x smaller than bf16; {self.total_seconds:.1f} s")
        if self.layers and not self.output_errors_measured:
            lines.append("output errors not measured: data-free RTN ran without a calibration pass (ask for one "
                         "with output_errors=True, or `quantpredict quantize --output-errors`)")
        elif self.layers:
            lines.append(f"mean output error: RTN {s['mean_output_error_rtn']:.3e}, this recipe "
                         f"{s['mean_output_error']:.3e}")
        if self.awq:
            lines.append(f"AWQ: {s['awq_groups']} scaling groups, mean alpha {s['awq_mean_ratio']:.2f}, group output "
                         f"error {s['awq_mean_loss_ratio']:.3f}x RTN's before clipping"
                         + (f"; clipping shrank {100 * s['awq_clipped_fraction']:.1f}% of the group maxima"
                            if self.awq_clips else ""))
        return "\n".join(lines)


def quantization_meta(recipe: Recipe, report: QuantReport | None, build: str, imatrix: str | None = None
                      ) -> dict[str, Any]:
    """The ``quantization.json`` a saved model carries: the recipe, its label, the report's summary, the build that
    wrote it (``build``) and, where the weights were rounded with one, the imatrix's label."""
    meta = {
        "recipe": recipe.to_dict(),
        "label": recipe.label,
        "report": None if report is None else report.summary(),
        "code_version": build,
    }
    if imatrix is not None:
        meta["imatrix"] = imatrix
    return meta


def quantization_json(meta: dict[str, Any]) -> str:
    """``meta`` as the text of ``quantization.json`` (sorted keys, indented, one trailing newline)."""
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def size_fields(q_bits: float, q_params: int, total_params: int) -> dict[str, float]:
    """A :class:`QuantReport`'s size fields: ``q_params`` quantized weights holding ``q_bits`` bits in all (scales
    included) among ``total_params`` parameters, every other one counted at 16 bits."""
    size_bytes = q_bits / 8 + (total_params - q_params) * 2
    return {
        "quantized_params": q_params,
        "total_params": total_params,
        "effective_bits_per_param": q_bits / q_params if q_params else 16.0,
        "model_bits_per_param": 8 * size_bytes / total_params,
        "size_bytes": size_bytes,
        "bf16_size_bytes": 2 * total_params,
        "compression_ratio": 2 * total_params / size_bytes,
    }
