"""``quantpredict profile MODEL``: measure a model's sensitivity profile once (or find it cached) and say where it
is."""

from __future__ import annotations

import argparse
import json

from quantpredict.cli import options
from quantpredict.cli.options import positive

CACHE_HELP = ("profiles are cached in $QUANTPREDICT_HOME/profiles/<model>-<key>/ (default "
              "~/.cache/quantpredict/profiles; $QUANTPREDICT_PROFILES names another folder), keyed by the weights, "
              "the calibration text, the protocol and the code version")


def add_no_cache(p: argparse.ArgumentParser) -> None:
    """``--no-cache``: measure the profile afresh, neither reading nor writing the profile cache."""
    p.add_argument("--no-cache", action="store_true",
                   help="measure MODEL's sensitivity profile afresh; do not read or write the profile cache")


def register(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure a model's sensitivity profile once (what rank and allocate read) and cache it",
        description="Measure MODEL's sensitivity profile on WikiText-2 train (8 windows of 256 tokens; a backward "
                    "pass over the first 2 gives the per-token layer inputs and output gradients that price a "
                    "recipe from its weights alone), or find it in the cache, and print where it is, its key, what "
                    "measuring it cost, its size on disk and the FP calibration NLL. rank and allocate use the same "
                    f"cache. {CACHE_HELP}. GPTQ and AWQ pricing also need every layer's input moment on the "
                    "recipe's calibration windows (128 windows of 256 tokens at seed 0, as quantize calibrates), "
                    "measured block by block (forward passes only) the first time such a recipe is priced, or now "
                    "with --gptq.")
    p.add_argument("model", metavar="MODEL", help="zoo name, imported model (smollm2-135m) or HF model directory")
    add_no_cache(p)
    p.add_argument("--gptq", action="store_true",
                   help="also measure the input moments GPTQ and AWQ recipes are priced with (the default "
                        "calibration's 128 x 256 windows; else measured on demand)")
    p.add_argument("--threads", type=positive(int), default=None, metavar="N",
                   help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from quantpredict.features.moments import InputMoments, LazyInputMoments
    from quantpredict.predict import profile_cache
    from quantpredict.predict.rank import profile_model
    from quantpredict.recipe import Recipe

    options.check_model(args.model)  # from file headers, before any weight loads
    if args.threads:
        torch.set_num_threads(args.threads)
    mp = profile_model(args.model, cache=not args.no_cache)
    prof = mp.profile
    # the default calibration's (what a GPTQ or AWQ recipe without -calNxL is priced with)
    moments, moments_seconds = mp.calibration_hessians(Recipe("int4", method="gptq")).moments, None
    if args.gptq and isinstance(moments, LazyInputMoments):  # not in the cache yet: measured now
        t = time.perf_counter()
        moments = moments.load()
        moments_seconds = time.perf_counter() - t
    has_moments = isinstance(moments, InputMoments)
    entry = mp.cache_dir
    doc = {
        "model": args.model, "cached": mp.cached, "path": None if entry is None else str(entry),
        "key": None if entry is None else entry.name.rpartition("-")[2],
        "seconds": mp.seconds, "measure_seconds": prof.seconds,
        "bytes": profile_cache.dir_bytes(entry) if entry is not None else None,
        "fp_calib_nll": prof.fp_nll, "fp_entropy_calib": prof.fp_entropy, "tokens": prof.tokens,
        "token_windows": int(next(iter(prof.token_grads.values())).shape[0]) if prof.token_grads else 0,
        "layers": len(prof.names), "input_moments": has_moments,
        "input_moments_bytes": moments.nbytes if has_moments else None,
        "input_moments_seconds": moments_seconds,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    where = (f"{'cached' if mp.cached else 'measured and cached'} in {entry}" if entry is not None
             else "measured, not cached (--no-cache)")
    print(f"{args.model}: sensitivity profile {where}")
    if entry is not None:
        print(f"key {doc['key']} (weights, calibration text, protocol, code version); {doc['bytes'] / 2**20:.1f} MiB "
              "on disk")
    print(f"{len(prof.names)} linear layers, {prof.tokens} calibration tokens ({doc['token_windows']} of them with "
          f"per-token terms); FP calibration NLL {prof.fp_nll:.4f} (entropy {prof.fp_entropy:.4f})")
    print(f"measuring it took {prof.seconds:.1f} s; this call {mp.seconds:.1f} s"
          + (" (read from the cache: no backward pass)" if mp.cached else ""))
    if has_moments:
        where = moments.directory if entry is not None else "a temporary folder (--no-cache: removed on exit)"
        print(f"GPTQ input moments (its default calibration, 128 windows of 256 tokens, for GPTQ and AWQ recipes): "
              f"{moments.nbytes / 2**20:.1f} MiB in {where}"
              + (f", measured now in {moments_seconds:.1f} s" if moments_seconds is not None else ""))
    else:
        print("GPTQ input moments: not measured yet (measured block by block the first time a GPTQ or AWQ recipe "
              "is priced, or now with --gptq)")
    return 0
