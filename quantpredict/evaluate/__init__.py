"""WikiText-2 perplexity with standard errors, and the quantized-vs-FP comparison (``quantpredict.evaluate``).

- :func:`perplexity` -> :class:`PerplexityResult` (a float carrying ``nll``, ``nll_se``, ``tokens``, ``windows``...)
- Both take the evaluation setting as one :class:`EvalSetting` (window length, number of windows, BOS, the user's
  text: what a run key names), or its fields as keywords (``max_windows=64``).
- :func:`compare` -> :class:`Comparison` (delta NLL / perplexity with paired standard errors, KL divergence, top-1
  agreement) of a quantized model against its FP original on the same windows; :func:`fill_fp_cache` runs its FP
  side alone into an :class:`FPLogitsCache`, so that the FP model can then be quantized in place (one copy).
- :class:`PartialResults`: a file where :func:`compare` keeps its finished windows, so that an interrupted
  comparison continues where it stopped (``evaluate.partial``).
- Building blocks: :func:`make_windows` / :class:`Windows` (windowing), :func:`window_nlls` (mean NLL per window),
  :func:`token_comparison` (per-position delta NLL, KL and top-1 from two models' logits),
  the ``*_of_ids`` / ``*_windows`` variants that take token ids or windows directly.

Standard errors are over windows, which are the (approximately) independent units; see ``evaluate.stats``.
"""

from quantpredict.evaluate.compare import Comparison, compare, compare_ids, compare_windows, fill_fp_cache
from quantpredict.evaluate.partial import PartialResults
from quantpredict.evaluate.perplexity import PerplexityResult, perplexity, perplexity_of_ids, perplexity_of_windows
from quantpredict.evaluate.scoring import FPLogitsCache, token_comparison, window_nlls
from quantpredict.evaluate.windows import Windows, make_windows
from quantpredict.recipe import EvalSetting

__all__ = [
    "EvalSetting",
    "FPLogitsCache",
    "Comparison",
    "PartialResults",
    "PerplexityResult",
    "Windows",
    "compare",
    "compare_ids",
    "compare_windows",
    "fill_fp_cache",
    "make_windows",
    "perplexity",
    "perplexity_of_ids",
    "perplexity_of_windows",
    "token_comparison",
    "window_nlls",
]
