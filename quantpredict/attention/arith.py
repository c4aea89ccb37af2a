"""Arithmetic expressions reduced step by step, where every step names the span of earlier tokens it needs.

The task: an expression of ``n`` single-digit operands joined by ``+ - *`` is evaluated strictly left to right, modulo
10. The trace writes the expression, then one line per reduction step (the two leftmost operands replaced by their
result), until a single digit remains::

    <bos>3+4*2-5......\\n      line 0: the question (a fixed-width line)
    >7*2-5..........\\n        step 1: 3+4 = 7
    >4-5............\\n        step 2: 7*2 = 14 = 4 (mod 10)
    >9..............\\n        step 3: 4-5 = -1 = 9 (mod 10)
    <eos>

Every line is padded to the same width (``width`` tokens, newline included), so a step's tokens sit at a fixed
distance from the tokens of the previous line they copy or combine. Each step line opens with a marker token that names
the span it needs: ``>`` means "the previous line" (``^2`` and ``^3`` style markers, ``SPAN_MARKERS``, name the last
two or three lines; this task only ever needs one). A model trained on these traces emits the marker itself, and
:func:`span_starts` turns the emitted markers into the key range each query attends to (plus the sink block at the
start), which is what the sparse decoder builds its masks from, on the fly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantpredict.errors import DataError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
NEWLINE, FILL = "\n", "."
# marker -> how many earlier lines its step needs
SPAN_MARKERS: dict[str, int] = {">": 1, "^2": 2, "^3": 3}
OPS = "+-*"
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, NEWLINE, FILL, *"0123456789", *OPS, *SPAN_MARKERS)
DEFAULT_WIDTH = 96


class ArithTokenizer:
    """The task's own tokenizer: one token per character, plus ``<pad> <bos> <eos>`` and the span markers."""

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = VOCAB
        self.index: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
        self.pad_id, self.bos_id, self.eos_id = self.index[PAD], self.index[BOS], self.index[EOS]
        self.newline_id = self.index[NEWLINE]
        self.marker_lines: dict[int, int] = {self.index[m]: k for m, k in SPAN_MARKERS.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        try:
            return [self.index[t] for t in tokens]
        except KeyError as exc:
            raise DataError(f"arith tokenizer: unknown token {exc.args[0]!r}; the task's tokens are {VOCAB}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    return (a * b) % 10


def _render(operands: Sequence[int], ops: Sequence[str]) -> list[str]:
    out = [str(operands[0])]
    for op, b in zip(ops, operands[1:]):
        out += [op, str(b)]
    return out


def max_operands(width: int = DEFAULT_WIDTH) -> int:
    """The most operands a line of ``width`` tokens holds (one slot for the marker, one for the newline)."""
    return (width - 2 + 1) // 2


@dataclass(frozen=True)
class ArithExample:
    """One task instance. ``tokens``: the whole trace (question line, step lines, ``<eos>``); ``n_prompt``: the
    length of the question line, i.e. the prompt a model is given; ``answer``: the expression's value (mod 10)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    tokens: tuple[str, ...]
    n_prompt: int
    answer: int
    width: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def make_example(n_operands: int, rng: random.Random, width: int = DEFAULT_WIDTH) -> ArithExample:
    """A random expression of ``n_operands`` digits and its full reduction trace (``n_operands`` lines + ``<eos>``)."""
    if not 1 <= n_operands <= max_operands(width):
        raise DataError(f"arith: n_operands={n_operands} must lie in [1, {max_operands(width)}] for width {width}; "
                        "use fewer operands or a wider line")
    operands = [rng.randrange(10) for _ in range(n_operands)]
    ops = [rng.choice(OPS) for _ in range(n_operands - 1)]
    a, o = list(operands), list(ops)
    tokens: list[str] = []
    first = True
    while True:
        body = _render(a, o)
        line = [BOS if first else ">"] + body
        tokens += line + [FILL] * (width - 1 - len(line)) + [NEWLINE]
        first = False
        if not o:
            break
        a = [_apply(a[0], o[0], a[1])] + a[2:]
        o = o[1:]
    tokens.append(EOS)
    return ArithExample(tuple(operands), tuple(ops), tuple(tokens), width, a[0], width)


def make_dataset(n: int, n_operands: int | tuple[int, int], seed: int,
                 width: int = DEFAULT_WIDTH) -> list[ArithExample]:
    """``n`` seeded examples; ``n_operands`` is a count or an inclusive ``(low, high)`` range drawn uniformly."""
    rng = random.Random(seed)
    lo, hi = (n_operands, n_operands) if isinstance(n_operands, int) else n_operands
    return [make_example(rng.randint(lo, hi), rng, width) for _ in range(n)]


def context_tokens(n_operands: int, width: int = DEFAULT_WIDTH) -> int:
    """Length of the full trace of an ``n_operands`` expression: ``n_operands`` lines and ``<eos>``."""
    return n_operands * width + 1


def span_starts(ids: Sequence[int] | torch.Tensor, tokenizer: ArithTokenizer) -> list[int]:
    """For every position ``p`` of a trace, the first key position its span needs (keys ``[start, p]``).

    Line 0 (the question) attends to itself causally (start 0). A line opened by a marker that names ``k`` lines
    attends from the start of the ``k``-th line before it; the span holds from the marker through the line's newline.
    An ``<eos>`` keeps the span of the line before it. This reads only tokens at or before ``p``, so a decoder can
    extend it one emitted token at a time (:class:`SpanTracker`).
    """
    tracker = SpanTracker(tokenizer)
    return [tracker.push(int(t)) for t in ids]


class SpanTracker:
    """Incremental :func:`span_starts`: ``push(token_id)`` returns the span start of the token's position."""

    def __init__(self, tokenizer: ArithTokenizer) -> None:
        self.tok = tokenizer
        self.pos = -1
        self.line_starts: list[int] = [0]
        self.start = 0
        self._after_newline = False

    def push(self, token_id: int) -> int:
        self.pos += 1
        if self._after_newline:
            self.line_starts.append(self.pos)
            self._after_newline = False
            k = self.tok.marker_lines.get(token_id)
            if k is not None:
                # the current line is line_starts[-1]; the k-th line before it starts at line_starts[-1 - k]
                self.start = self.line_starts[max(0, len(self.line_starts) - 1 - k)]
            elif token_id != self.tok.eos_id:
                self.start = 0  # a line without a marker needs everything: dense for that line
        if token_id == self.tok.newline_id:
            self._after_newline = True
        return self.start


def training_batch(n_operands: int, batch: int, rng: random.Random, tokenizer: ArithTokenizer,
                   width: int = DEFAULT_WIDTH) -> torch.Tensor:
    """``[batch, n_operands * width + 1]`` token ids of random traces (all the same length, no padding needed)."""
    rows = [tokenizer.encode(make_example(n_operands, rng, width).tokens) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.long)
