"""The seed studies: the experiments behind most pages in ``reports/``, and their renderers.

A study uses the library (models, quantizers, QAT, the run store, the predictors, the figure look) and judges it on
measurements; nothing in the library depends on a study. So this package sits above ``predict`` and ``report``,
and only the CLI (``quantpredict study``) imports it; the other pages are rendered by the scripts in
``benchmarks/`` (``tests/test_layering.py`` checks the floor).

- QAT vs PTQ: :mod:`.study` (``quantpredict study ptq-vs-qat``: FP/RTN/GPTQ/QAT perplexities at the same data budget
  and the local-vs-global misalignment paths), :mod:`.report` (``reports/qat.md``), :mod:`.hurts` (its sections
  where quantization hurts: a real model and long-trained checkpoints), :mod:`.figures` (the figures both share).
- SmoothQuant+GPTQ: :mod:`.sq_study` (``quantpredict study smoothquant``, the top sections of ``reports/ptq.md``).
- Training tokens: :mod:`.training_tokens` (``reports/training_tokens.md``: damage against training tokens per
  parameter, Ouyang et al.'s law).
- Real models: :mod:`.real_models` (``reports/real_models.md``: the real models' runs and the predictors' first
  contact with them).
- Formats: :mod:`.formats` (``reports/formats.md``: KLD and perplexity against bits for the layouts checkpoints ship).
- Rank and allocate, judged: :mod:`.rank_report` (``reports/rank.md``).
"""
