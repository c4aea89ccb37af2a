"""The feature schema: every name ``features.extract`` returns, its group, definition and unit (torch-free).

This table is the contract between ``features`` (which computes them), ``runs`` (one store column each) and
``predict`` (which records the schema it was fitted on). Add rows freely; never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    group: str  # extract(which=...) selects groups; each group also reports "<group>_seconds"
    definition: str
    cost: str


FEATURES: tuple[FeatureSpec, ...] = (
    # model: the model alone, no quantization
    FeatureSpec("n_params_nonembed", "model", "non-embedding parameter count", "free"),
    FeatureSpec("n_layers", "model", "transformer blocks", "free"),
    FeatureSpec("hidden_size", "model", "model width", "free"),
    FeatureSpec("fp_calib_nll", "model", "FP next-token NLL on the calibration batch (nats): the pre-trained loss",
                "1 forward"),
    # format: the recipe's number format
    FeatureSpec("bits_per_element", "format", "weight bits per element, shared scales included", "free"),
    FeatureSpec("element_is_fp", "format", "1 for floating-point elements (FP8, MXFP), 0 for integers", "free"),
    FeatureSpec("block_size", "format", "elements sharing one scale (the row length for per-channel)", "free"),
    # noise: round-to-nearest quantization noise
    FeatureSpec("rtn_sqnr_db", "noise", "model-level weight SQNR under RTN, 10 log10(sum W^2 / sum dW^2) (dB)",
                "1 pass over weights"),
    FeatureSpec("rtn_sqnr_db_min", "noise", "worst layer's weight SQNR under RTN (dB)", "1 pass over weights"),
    FeatureSpec("rtn_rel_weight_error", "noise", "||Q(W) - W|| / ||W|| over all quantized weights",
                "1 pass over weights"),
    FeatureSpec("out_sqnr_db_mean", "noise", "mean over linear layers of the output SQNR on calibration inputs (dB)",
                "1 forward"),
    FeatureSpec("out_sqnr_db_min", "noise", "worst linear layer's output SQNR on calibration inputs (dB)",
                "1 forward"),
    FeatureSpec("out_sqnr_worst_depth", "noise",
                "relative depth (block index + 0.5) / n_layers of the layer with the worst output SQNR", "1 forward"),
    # curvature: Hessian of the calibration NLL w.r.t. the quantized weights
    FeatureSpec("hessian_trace", "curvature", "Hutchinson estimate of tr(H) over quantized weights", "n_probes HVPs"),
    FeatureSpec("hessian_trace_se", "curvature", "standard error of hessian_trace", "with hessian_trace"),
    FeatureSpec("hessian_trace_per_param", "curvature", "hessian_trace / quantized parameter count",
                "with hessian_trace"),
    FeatureSpec("top_eigenvalue", "curvature", "largest-magnitude Hessian eigenvalue, signed (power iteration)",
                "<= max_iter HVPs"),
    FeatureSpec("trace_x_noise_var", "curvature", "0.5 * tr(H) * mean(dW^2): the isotropic-noise loss estimate",
                "with hessian_trace"),
    FeatureSpec("hessian_trace_max_block_share", "curvature",
                "largest per-block Hutchinson trace / hessian_trace (same probes): how concentrated curvature is",
                "with hessian_trace"),
    # landscape: along the quantization direction delta = Q(W) - W of the recipe
    FeatureSpec("grad_dot_delta", "landscape", "first-order term g . delta (nats)", "1 backward"),
    FeatureSpec("quad_delta_h_delta", "landscape", "second-order term 0.5 delta^T H delta (nats)", "1 HVP"),
    FeatureSpec("taylor_dnll", "landscape", "grad_dot_delta + quad_delta_h_delta (nats)", "with the above"),
    FeatureSpec("radial_dnll_025", "landscape", "measured NLL(W + 0.25 delta) - NLL(W) (nats)", "1 forward"),
    FeatureSpec("radial_dnll_050", "landscape", "measured NLL(W + 0.5 delta) - NLL(W) (nats)", "1 forward"),
    FeatureSpec("radial_dnll_100", "landscape", "measured NLL(W + delta) - NLL(W) on the calibration batch (nats)",
                "1 forward"),
    FeatureSpec("sharpness_random", "landscape",
                "mean NLL increase under Gaussian weight noise of the same per-layer norm as delta (nats)",
                "n forwards"),
    # gptq_proxy: layer-wise objectives from the PTQ backend's Hessians
    FeatureSpec("gptq_proxy_rtn", "gptq_proxy", "sum over layers of tr(dW H dW^T) for RTN", "1 forward + GPTQ"),
    FeatureSpec("gptq_proxy_gptq", "gptq_proxy", "sum over layers of tr(dW H dW^T) for GPTQ", "1 forward + GPTQ"),
    # fisher: the second-order KL along delta, exactly (forward-mode JVP), and the measured change on calibration
    FeatureSpec("fisher_quad", "fisher", "0.5 delta^T F delta: second-order KL(P_fp || P_q) with F the Fisher of the "
                "next-token distribution, by a Jacobian-vector product on the calibration batch (nats)", "1 JVP"),
    FeatureSpec("kl_calib", "fisher", "measured mean KL(P_fp || P_q) on the calibration batch (nats)", "1 forward"),
    FeatureSpec("dnll_calib", "fisher", "measured NLL(W + delta) - NLL(W) on the calibration batch (nats; equals "
                "radial_dnll_100)", "with kl_calib"),
    FeatureSpec("top1_calib", "fisher", "top-1 agreement of P_q with P_fp on the calibration batch (fraction)",
                "with kl_calib"),
    FeatureSpec("kl_calib_se", "fisher", "standard error of kl_calib over the calibration windows (nats)",
                "with kl_calib"),
    FeatureSpec("dnll_calib_se", "fisher", "standard error of dnll_calib over the calibration windows (nats)",
                "with kl_calib"),
    FeatureSpec("fp_entropy_calib", "fisher", "mean next-token entropy of the FP model on the calibration batch "
                "(nats)", "with the JVP"),
    # profile: the recipe priced from weights alone against per-layer K-FAC factors measured once per model
    FeatureSpec("kfac_quad", "profile", "0.5 sum_l tr(dW_l A_l dW_l^T G_l): block-diagonal K-FAC estimate of "
                "0.5 delta^T F delta from the model's profile (nats)", "weights only"),
    FeatureSpec("kfac_quad_diag", "profile", "kfac_quad with the diagonal of each output factor G_l (nats)",
                "weights only"),
    FeatureSpec("kfac_max_layer_share", "profile", "largest layer's share of the second-order KL (token_gn_quad's "
                "terms)", "weights only"),
    FeatureSpec("token_gn_quad", "profile", "0.5 sum_l mean_t (s_t^T dW_l x_t)^2 from every profile token's layer "
                "inputs and sampled output gradients: exact per token, cross-position and cross-layer terms dropped "
                "(nats)", "weights only"),
    FeatureSpec("token_cross_quad", "profile", "0.5 mean_t (sum_l s_lt^T dW_l x_lt)^2: token_gn_quad with the "
                "cross-layer terms at each position kept (one sampled label per position drives every layer's "
                "gradient); cross-position terms dropped (nats)", "weights only"),
)

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.group for f in FEATURES))
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
TIMING_NAMES: tuple[str, ...] = tuple(f"{g}_seconds" for g in GROUPS)
