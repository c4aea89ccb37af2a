"""Test helper: synthetic run tables with the run store's public columns, drawn from a known law with known noise.

The predictor, CLI and report tests use it where the truth must be known (interval coverage, recovered exponents)
or where a real sweep would be too slow. The law (natural logs):

    log delta_true = LAW_INTERCEPT + LAW_QUAD * log(quad_delta_h_delta) + LAW_FP * element_is_fp
                     + LAW_SIZE * log(n_params_nonembed / 1e7) + eps,       eps ~ N(0, sigma^2)
    delta (measured) = delta_true + N(0, delta_nll_se^2)

``quad_delta_h_delta`` itself is driven by a hidden per-model curvature (a family effect plus model scatter) times
the recipe's squared weight error, so features that see curvature can explain what size and bits alone cannot.
All other schema features are generated plausibly around these quantities.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from quantpredict.schema import FEATURE_NAMES, TIMING_NAMES

LAW_INTERCEPT = 0.25
LAW_QUAD = 1.0
LAW_FP = 0.15
LAW_SIZE = -0.1

# name -> (element bits, is floating point, MX block scaling)
SYNTH_FORMATS: dict[str, tuple[int, bool, bool]] = {
    "mxint8": (8, False, True), "mxint6": (6, False, True), "mxint4": (4, False, True), "mxint3": (3, False, True),
    "mxfp8_e4m3": (8, True, True), "mxfp6_e3m2": (6, True, True), "mxfp4_e2m1": (4, True, True),
    "int8": (8, False, False), "int4": (4, False, False), "int3": (3, False, False),
}
FAMILY_CURVATURE = {"llama": 0.0, "opt": 0.5, "gpt2": -0.4, "gpt_neox": 0.25}


def synthetic_runs(n_models: int = 12, *, families: tuple[str, ...] = tuple(FAMILY_CURVATURE),
                   formats: tuple[str, ...] = tuple(SYNTH_FORMATS), methods: tuple[str, ...] = ("rtn", "gptq"),
                   block_sizes: tuple[int, ...] = (32, 128), sigma: float = 0.2, delta_se: float = 3e-4,
                   n_failed: int = 2, seed: int = 0) -> pd.DataFrame:
    """A run table: ``n_models`` models (families cycled) x formats x MX block sizes x methods.

    ``sigma``: std of the law's log-space noise; ``delta_se``: std of the additive measurement noise on delta (also
    written to ``delta_nll_se``). ``n_failed`` extra rows have ``status == "failed"`` and no measurements.
    Returns one row per run with the public columns, every schema feature and the ``<group>_seconds`` timings.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(n_models):
        fam = families[m % len(families)]
        n = float(10 ** rng.uniform(6, 8))
        hidden = int(2 ** np.round(np.log2((n / 12) ** (1 / 3) * 4)))
        layers = max(2, int(round(n / (12 * hidden**2))))
        fp_calib = 2.6 + 3.0 * (n / 1e6) ** -0.08 + rng.normal(0, 0.05)
        nll_fp = fp_calib + 0.12 + rng.normal(0, 0.03)
        curv = np.exp(FAMILY_CURVATURE[fam] + rng.normal(0, 0.3)) * (n / 1e7) ** -0.3  # hidden sharpness
        fmt_jitter = {f: np.exp(rng.normal(0, 0.05)) for f in formats}
        name = f"{fam}-{m:02d}"
        for fmt in formats:
            bits, is_fp, mx = SYNTH_FORMATS[fmt]
            for bs in (block_sizes if mx else (None,)):
                c = (0.33 if is_fp else 0.28) * (1.0 if not mx else (1.0 if bs == 32 else 1.25))
                c = c if mx else 0.6
                rel_err = c * 2.0**-bits * fmt_jitter[fmt]
                bpe = bits + (8 / bs if mx else 32 / hidden)
                for method in methods:
                    g = 0.55 if method == "gptq" else 1.0
                    quad = curv * 30 * (rel_err * g) ** 2 * np.exp(rng.normal(0, 0.05))
                    log_d = (LAW_INTERCEPT + LAW_QUAD * np.log(quad) + LAW_FP * is_fp
                             + LAW_SIZE * np.log(n / 1e7) + rng.normal(0, sigma))
                    d_true = float(np.exp(log_d))
                    delta = d_true + rng.normal(0, delta_se)
                    trace = curv * n * 2e-3 * np.exp(rng.normal(0, 0.1))
                    sqnr = -20 * np.log10(rel_err)
                    feats = {
                        "n_params_nonembed": n, "n_layers": layers, "hidden_size": hidden, "fp_calib_nll": fp_calib,
                        "bits_per_element": bpe, "element_is_fp": float(is_fp),
                        "block_size": float(bs if mx else hidden),
                        "rtn_sqnr_db": sqnr, "rtn_sqnr_db_min": sqnr - rng.uniform(2, 6),
                        "rtn_rel_weight_error": rel_err,
                        "out_sqnr_db_mean": sqnr - 1 - 20 * np.log10(g) + rng.normal(0, 0.5),
                        "out_sqnr_db_min": sqnr - 5 - 20 * np.log10(g) + rng.normal(0, 1.0),
                        "hessian_trace": trace, "hessian_trace_se": 0.05 * trace,
                        "hessian_trace_per_param": trace / n, "top_eigenvalue": trace / n * 200,
                        "trace_x_noise_var": 0.5 * trace / n * (rel_err * g) ** 2 * np.exp(rng.normal(0, 0.2)),
                        "grad_dot_delta": rng.normal(0, 0.3 * quad), "quad_delta_h_delta": quad,
                        "radial_dnll_025": d_true / 16 * np.exp(rng.normal(0, 0.3)),
                        "radial_dnll_050": d_true / 4 * np.exp(rng.normal(0, 0.3)),
                        "radial_dnll_100": d_true * np.exp(rng.normal(0, 0.3)) + rng.normal(0, 1e-4),
                        "sharpness_random": quad * rng.uniform(0.5, 1.5),
                        "gptq_proxy_rtn": curv * n * rel_err**2, "gptq_proxy_gptq": curv * n * (rel_err * g) ** 2,
                    }
                    feats["taylor_dnll"] = feats["grad_dot_delta"] + quad
                    label = f"{fmt}" + (f"-b{bs}" if mx else "") + f"-{method}"
                    rows.append({
                        "model": name, "family": fam, "n_params": n * 1.3, "recipe": label, "weight_format": fmt,
                        "block_size": bs, "method": method, "smoothquant_alpha": np.nan, "act_format": None,
                        "ppl_fp": float(np.exp(nll_fp)), "ppl_quant": float(np.exp(nll_fp + delta)),
                        "nll_fp": nll_fp, "nll_quant": nll_fp + delta, "delta_nll_se": delta_se,
                        "kld": max(d_true, 0) * 1.2, "top1_agree": float(np.exp(-d_true)), "eval_tokens": 65536,
                        "status": "done", **feats,
                        **{t: n * 1e-7 * (i + 1) for i, t in enumerate(TIMING_NAMES)},
                    })
    df = pd.DataFrame(rows)
    for i in range(n_failed):
        bad = df.iloc[i % len(df)].copy()
        for col in ("ppl_quant", "nll_quant", "kld", "top1_agree", *FEATURE_NAMES):
            bad[col] = np.nan
        bad["status"] = "failed"
        bad["recipe"] = f"{bad['recipe']}-failed{i}"
        df = pd.concat([df, bad.to_frame().T], ignore_index=True)
    return df.infer_objects()
