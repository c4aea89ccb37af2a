"""One-go GPU check: CUDA results equal CPU results within float tolerance, from a tree without the zoo weights.

Run on a machine with a CUDA GPU (torch built with CUDA; Triton for the sparse-attention kernel test):

    python benchmarks/gpu_check.py              # CUDA against CPU, then the CUDA tests
    python benchmarks/gpu_check.py --device cpu # the CPU fallback: the same checks, CPU against CPU

No download and no zoo weights: a small Llama (hidden 256, 4 blocks, a 49,152-token vocabulary so the chunked head
runs) is built from a seeded config, and every input is seeded token ids. Checks, each CPU against ``--device``:

1. evaluation: perplexity and the FP-vs-quantized comparison (delta NLL, KL, top-1), float32, and bf16 on the device
   against float32 on the CPU;
2. quantization: MXINT4 RTN and GPTQ with the model on the CPU and its blocks computed on the device, and with the
   whole model on the device (GPTQ may flip a few rounding ties: at most 1% of the weights);
3. features: every group, with the whole batch in one graph and with one window per graph;
4. pytest: ``tests/test_attention.py`` (its Triton kernel test needs CUDA) and the CUDA test of
   ``tests/test_memory.py``.

Prints one line per check and exits 1 if any fails. Without CUDA and without ``--device cpu`` it says so and exits 2.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOSS_DIFFERENCES = ("radial_dnll_025", "radial_dnll_050", "radial_dnll_100", "sharpness_random")


def build_model(hidden: int = 256, layers: int = 4, vocab: int = 49152, seed: int = 0):
    """A seeded random Llama with eager attention (double backward works through it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def token_windows(n: int, seq: int, vocab: int, seed: int = 1):
    import torch

    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


class Checks:
    """Collects ``(name, ok, detail)`` and prints each as it comes."""

    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def close(self, name: str, got: float, want: float, *, rel: float, abs_: float = 0.0) -> None:
        ok = math.isfinite(got) and abs(got - want) <= max(rel * abs(want), abs_)
        self.add(name, ok, f"{got:.6g} vs CPU {want:.6g} (tolerance rel {rel:g}, abs {abs_:g})")

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _ in self.rows)


def check_evaluation(checks: Checks, model, device, windows) -> None:
    import torch

    from quantpredict.evaluate import Windows, compare_windows, perplexity_of_windows
    from quantpredict.memory import placed
    from quantpredict.quantize import Recipe, quantize_model

    w = Windows(windows, torch.ones(windows.shape[0], dtype=torch.long))
    q = copy.deepcopy(model)
    quantize_model(q, Recipe("mxint4"), windows[:1], progress=False)
    cpu_ppl = perplexity_of_windows(model, w, progress=False)
    cpu_cmp = compare_windows(model, q, w, progress=False)
    with placed([model, q], device):
        dev_ppl = perplexity_of_windows(model, w, progress=False)
        dev_cmp = compare_windows(model, q, w, progress=False)
    checks.close("evaluate: NLL (fp32)", dev_ppl.nll, cpu_ppl.nll, rel=1e-4)
    checks.close("compare: delta NLL (fp32)", dev_cmp.delta_nll, cpu_cmp.delta_nll, rel=1e-2, abs_=1e-5)
    checks.close("compare: KL (fp32)", dev_cmp.kld, cpu_cmp.kld, rel=1e-2, abs_=1e-6)
    checks.close("compare: top-1 % (fp32)", dev_cmp.top1_agreement_pct, cpu_cmp.top1_agreement_pct, rel=0, abs_=0.5)
    bf16, qb = copy.deepcopy(model).to(device, torch.bfloat16), copy.deepcopy(q).to(device, torch.bfloat16)
    checks.close("evaluate: NLL (bf16 on the device vs fp32 CPU)", perplexity_of_windows(bf16, w, progress=False).nll,
                 cpu_ppl.nll, rel=1e-2)
    checks.close("compare: KL (bf16 on the device vs fp32 CPU)", compare_windows(bf16, qb, w, progress=False).kld,
                 cpu_cmp.kld, rel=0.25, abs_=1e-4)


def check_quantization(checks: Checks, model, device, calib) -> None:
    from quantpredict.quantize import Recipe, quantize_model

    for method in ("rtn", "gptq"):
        recipe = Recipe("mxint4", method=method, calib_samples=calib.shape[0], calib_seq_len=calib.shape[1])
        cpu = copy.deepcopy(model)
        rep_cpu = quantize_model(cpu, recipe, calib, progress=False, output_errors=True)
        blockwise = copy.deepcopy(model)  # the model stays on the CPU, each block computes on the device
        rep_blk = quantize_model(blockwise, recipe, calib, progress=False, output_errors=True, device=device)
        whole = copy.deepcopy(model).to(device)
        quantize_model(whole, recipe, calib, progress=False, output_errors=True)
        for tag, m in (("blocks on the device", blockwise), ("model on the device", whole.cpu())):
            a, b = cpu.state_dict(), m.state_dict()
            changed = sum(int((a[k] != b[k]).sum()) for k in a)
            total = sum(a[k].numel() for k in a)
            limit = 0 if method == "rtn" else 0.01 * total
            checks.add(f"quantize {method.upper()}: weights, {tag}", changed <= limit,
                       f"{changed} of {total} weights differ from the CPU's (allowed {int(limit)})")
        err_cpu = sum(r.output_error for r in rep_cpu.layers)
        err_dev = sum(r.output_error for r in rep_blk.layers)
        checks.close(f"quantize {method.upper()}: summed output error", err_dev, err_cpu, rel=1e-2)


def check_features(checks: Checks, model, device, calib) -> None:
    from quantpredict.features import extract
    from quantpredict.quantize import Recipe

    opts = dict(n_windows=4, seq_len=64, n_probes=2, max_iter=3)
    for tag, extra in (("whole batch", {}), ("one window per graph", {"micro_batch": 1})):
        cpu = extract(model, Recipe("mxint4"), calib, **opts, **extra)
        dev = extract(model, Recipe("mxint4"), calib, device=device, **opts, **extra)
        nll = cpu["fp_calib_nll"]
        bad = []
        for k, v in cpu.items():
            if k.endswith("_seconds"):
                continue
            tol = 1e-4 * nll if k in LOSS_DIFFERENCES else max(2e-2 * abs(v), 1e-6)
            if k in ("hessian_trace", "hessian_trace_se", "top_eigenvalue", "hessian_trace_per_param",
                     "trace_x_noise_var", "hessian_trace_max_block_share"):
                tol = max(5e-2 * abs(v), 1e-6)  # power iteration and Hutchinson amplify rounding
            if not math.isfinite(dev[k]) or abs(dev[k] - v) > tol:
                bad.append(f"{k} {dev[k]:.6g} vs {v:.6g}")
        checks.add(f"features ({tag}): every group", not bad, "; ".join(bad) or f"{len(cpu)} values agree")


def run_pytests(checks: Checks, device) -> None:
    """The attention tests (with the Triton kernel test, which must run, not skip, on a CUDA device) and the CUDA
    test of test_memory.py (which needs the zoo's llama-s: it is skipped, with its reason, in a tree without it)."""
    for args, must_run in ((["tests/test_attention.py"], "test_triton_matches_reference"),
                           (["tests/test_memory.py", "-k", "cuda"], None)):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", *args], cwd=ROOT, capture_output=True,
                              text=True)
        lines = proc.stdout.strip().splitlines() or ["(no output)"]
        skipped = [ln for ln in lines if ln.startswith("SKIPPED")]
        ok = proc.returncode == 0
        if device.type == "cuda" and must_run and any(must_run in ln or "triton" in ln for ln in skipped):
            ok = False  # on a GPU the kernel test must run: a skip means Triton is missing
        checks.add(f"pytest {' '.join(args)}", ok, lines[-1] + ("; " + "; ".join(skipped) if skipped else ""))


def run_checks(device: str = "cuda", *, hidden: int = 256, layers: int = 4, vocab: int = 49152,
               pytests: bool = True) -> Checks:
    """Every check of the module docstring, CPU against ``device``; returns the :class:`Checks`."""
    import torch

    from quantpredict.memory import resolve_device

    dev = resolve_device(device, flag="--device")
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    model = build_model(hidden, layers, vocab)
    checks = Checks()
    t0 = time.perf_counter()
    check_evaluation(checks, model, dev, token_windows(12, 128, vocab))
    check_quantization(checks, model, dev, token_windows(16, 128, vocab, seed=2))
    check_features(checks, model, dev, token_windows(8, 64, vocab, seed=3))
    if pytests:
        run_pytests(checks, dev)
    print(f"{len(checks.rows) - checks.failed} of {len(checks.rows)} checks passed in {time.perf_counter() - t0:.0f} s")
    return checks


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="device checked against the CPU (default cuda)")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest runs")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here; run this on a GPU machine, or with --device cpu for the CPU fallback",
              file=sys.stderr)
        return 2
    checks = run_checks(args.device, pytests=not args.no_pytest)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
