"""Does the weights-only price see the text llama-perplexity reads? The token-wise price of llama.cpp's Q8_0 and
Q4_K_M whole files (the llama.cpp-cpu runtime, llama-perplexity's 512-token windows, the second half scored) on
profiles cut from three texts: WikiText-2 train (rare words as ``<unk>``: the default), the ``<unk>`` test split and
``wiki.test.raw``, the last two past their first 64 chunks of 512 tokens (which llama-perplexity's ``--chunks 32``
scores). The measurement moves by 11-14% between the two test texts (``llamacpp_reference.py text-table``).

    .venv/bin/python benchmarks/text_price_check.py [--model smollm2-135m] [--token-windows 8]

No profile is cached (``cache=False``): each text's profile is measured fresh, with ``--token-windows`` windows for
the token-wise terms instead of the shipped 2 (``rank.TOKEN_WINDOWS``, set for this process only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamacpp_reference as ref  # noqa: E402

SKIP = 64 * 512


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--token-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from quantpredict import data, models
    from quantpredict.predict import rank
    from quantpredict.threads import torch_threads

    rank.TOKEN_WINDOWS = args.token_windows
    with torch_threads(args.threads):
        fp, tok = models.load(args.model, dtype=torch.float32, attn_implementation="eager")
        recipes = [ref.file_recipe(n, fp) for n in ("q8_0-rtn", "q4_k_m")]
        del fp
        for label, text in (("WikiText-2 train", None), ("test, <unk>", ("wikitext2", "test")),
                            ("wiki.test.raw", ("wikitext2-raw", "test"))):
            calib = None
            if text is not None:
                stream = data.token_stream(tok, *text, protocol=data.eval_protocol(tok))
                calib = data.TokenStream(stream.ids[SKIP:], stream.bos_id, f"{stream.source}[{SKIP}:]")
            t = time.perf_counter()
            frame = rank.rank_recipes(args.model, recipes, runtime="llama.cpp-cpu", protocol="llama.cpp",
                                      calib=calib, cache=False).set_index("recipe")
            klds = ", ".join(f"{n} {float(frame.loc[r.label, 'kld']):.5f}" for n, r in zip(("Q8_0", "Q4_K_M"),
                                                                                         recipes))
            print(f"{label:18s} {args.token_windows} token windows: predicted KLD {klds} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
