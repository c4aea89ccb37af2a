"""Dense vs on-the-fly sparse generation of the arithmetic task model on held-out expressions, and its report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from quantpredict.attention.arith import ArithExample, ArithTokenizer, make_dataset
from quantpredict.attention.arith_model import BLOCK_SIZE, SINK_BLOCKS, generate, load_model
from quantpredict.attention.bench import REPORT_NAME, machine, md_table, write_section


@dataclass(frozen=True)
class ArithEval:
    """One expression size: exact-match accuracy of the final answer and of the whole trace for (a) dense and (b)
    sparse decoding, how often the two generations agree token for token, the sparse path's mean attention density
    (attended keys / causal keys over all decode steps) and the end-to-end generation throughput of each: generated
    tokens per second of the decoding thread's CPU time (``*_tok_s``, robust on a shared machine) and of wall time
    (``*_wall_tok_s``)."""

    n_operands: int
    context_tokens: int
    n_examples: int
    dense_answer_acc: float
    sparse_answer_acc: float
    dense_trace_acc: float
    sparse_trace_acc: float
    agreement: float
    density: float
    dense_tok_s: float
    sparse_tok_s: float
    dense_wall_tok_s: float = float("nan")
    sparse_wall_tok_s: float = float("nan")

    @property
    def throughput_ratio(self) -> float:
        return self.sparse_tok_s / self.dense_tok_s


def answer_of(tokens: list[int], tok: ArithTokenizer) -> int | None:
    """The digit on the last step line of a finished (``<eos>``-terminated) trace, else None."""
    text = tok.decode(tokens)
    if not text.endswith("<eos>"):
        return None
    lines = [ln for ln in text.split("\n") if ln.startswith(">")]
    body = lines[-1][1:].rstrip(".") if lines else ""
    return int(body) if body.isdigit() and len(body) == 1 else None


def evaluate_size(model, examples: list[ArithExample], *, batch_size: int = 8,
                  progress: tqdm | None = None) -> ArithEval:
    """Both modes on the same batches, alternating dense and sparse batch by batch (so machine load hits both)."""
    tok = ArithTokenizer()
    acc = {m: [0, 0] for m in ("dense", "sparse")}
    secs = {"dense": 0.0, "sparse": 0.0}
    wall = {"dense": 0.0, "sparse": 0.0}
    new = {"dense": 0, "sparse": 0}
    dens, agree = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        prompts = torch.tensor([tok.encode(e.tokens[: e.n_prompt]) for e in chunk])
        max_len = chunk[0].n_tokens + chunk[0].width  # room for a model that overruns by a line
        outs = {}
        for mode in (("dense", "sparse") if (i // batch_size) % 2 == 0 else ("sparse", "dense")):
            res = generate(model, prompts, max_len, sparse=mode == "sparse", block_size=BLOCK_SIZE,
                           sink_blocks=SINK_BLOCKS)
            outs[mode] = res.tokens
            secs[mode] += res.cpu_seconds
            wall[mode] += res.seconds
            new[mode] += res.new_tokens
            if mode == "sparse":
                dens += res.density * len(chunk)
            for e, toks in zip(chunk, res.tokens):
                acc[mode][0] += answer_of(toks, tok) == e.answer
                acc[mode][1] += toks == tok.encode(e.tokens)
            if progress is not None:
                progress.update(len(chunk))
        agree += sum(a == b for a, b in zip(outs["dense"], outs["sparse"]))
    m = len(examples)
    return ArithEval(len(examples[0].operands), examples[0].n_tokens, m, acc["dense"][0] / m, acc["sparse"][0] / m,
                     acc["dense"][1] / m, acc["sparse"][1] / m, agree / m, dens / m,
                     new["dense"] / secs["dense"], new["sparse"] / secs["sparse"],
                     new["dense"] / wall["dense"], new["sparse"] / wall["sparse"])


def eval_arith(model_dir: Path, operands: list[int], *, n_examples: int = 16, batch_size: int = 8,
               seed: int = 12345, out: Path | None = Path("reports")) -> list[ArithEval]:
    """Evaluate the trained model at each expression size; write the ``arith`` section of ``out/attention.md``."""
    model, spec = load_model(model_dir)
    info = json.loads((Path(model_dir) / "arith.json").read_text())
    results = []
    bar = tqdm(total=2 * n_examples * len(operands), desc="eval-arith (dense + sparse)")
    for k, n in enumerate(operands):
        examples = make_dataset(n_examples, n, seed=seed + k, width=spec.width)
        results.append(evaluate_size(model, examples, batch_size=batch_size, progress=bar))
    bar.close()
    df = pd.DataFrame([{**asdict(r), "throughput_ratio": r.throughput_ratio} for r in results])
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if out is not None:
        write_section(Path(out) / REPORT_NAME, "arith", arith_markdown(df, spec, info, batch_size))
        df.to_csv(Path(out) / "attention_arith.csv", index=False)
    return results


def arith_markdown(df: pd.DataFrame, spec, info: dict, batch_size: int) -> str:
    train = info.get("train", {})
    t = pd.DataFrame({
        "operands": df["n_operands"], "context": df["context_tokens"], "examples": df["n_examples"],
        "answer acc dense": df["dense_answer_acc"].round(3), "answer acc sparse": df["sparse_answer_acc"].round(3),
        "trace acc dense": df["dense_trace_acc"].round(3), "trace acc sparse": df["sparse_trace_acc"].round(3),
        "dense = sparse": df["agreement"].round(3), "density %": (100 * df["density"]).round(1),
        "dense tok/s": df["dense_tok_s"].round(0).astype(int), "sparse tok/s": df["sparse_tok_s"].round(0).astype(int),
        "sparse/dense": df["throughput_ratio"].round(2),
        "dense tok/s wall": df["dense_wall_tok_s"].round(0).astype(int),
        "sparse tok/s wall": df["sparse_wall_tok_s"].round(0).astype(int),
    })
    n_params = 2 * spec.layers * (4 * spec.hidden ** 2 + 3 * spec.hidden * spec.intermediate) // 2
    return (
        "## Part 2: spans the model selects itself (arithmetic task)\n\n"
        f"Measured {machine()}.\n\n"
        "Task (`quantpredict.attention.arith`): an expression of n single-digit operands and `+ - *`, evaluated left "
        "to right mod 10, one reduction per line; every line is padded to "
        f"{spec.width} tokens and every step line opens with the marker `>` (\"my span is the previous line\"), "
        "which the model emits itself. The sparse decoder turns each emitted marker into the row's attended "
        f"blocks (blocks of {BLOCK_SIZE}: previous line + current line, {SINK_BLOCKS} sink blocks) and runs "
        "`sparse_decode_attention` on them; dense runs SDPA over the whole KV cache. Both paths share every other "
        "line of the decoder (same model modules, same KV cache), so the throughput ratio isolates attention.\n\n"
        f"Model: `LlamaForCausalLM`, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads, MLP "
        f"{spec.intermediate}, tied embeddings (~{n_params / 1e3:.0f}k non-embedding parameters), trained from "
        f"scratch on the CPU with one thread for {train.get('minutes', float('nan')):.1f} min of wall time "
        f"({train.get('steps', '?')} steps of ~{train.get('tokens_per_step', '?')} tokens, half of them under the "
        "span masks, half dense), on a machine shared with other jobs. Held-out expressions come from a different "
        f"seed. Greedy decoding, batch {batch_size}, one thread; tok/s = generated tokens / CPU time of the decoding "
        "thread for the whole generation (prefill included; wall time is shown too, and on a shared machine it "
        "mostly measures the wait for a core), dense and sparse batches alternating; sparse/dense is the CPU-time "
        "throughput ratio. Where the same contiguous span holds for the whole batch (the common case), the sparse "
        "kernel reads it as a view of the cache (`block_index` given as a `range`).\n\n"
        "answer acc: final digit right (trace finished with `<eos>`); trace acc: every generated token right; "
        "dense = sparse: the two generations identical token for token.\n\n"
        f"{md_table(t)}\n"
    )
