"""A small Llama (``transformers`` LlamaForCausalLM, the zoo's family) trained on the arithmetic task, and a decoder
that runs it with dense attention or with block-sparse masks built on the fly from the spans the model emits.

The decoder re-uses the model's own modules (norms, projections, rotary embedding, MLP) and swaps only the attention
over its KV cache: dense SDPA over the whole cache, or :func:`~quantpredict.attention.kernels.sparse_decode_attention`
over the blocks the current span needs. Both paths share every other line of code, so their throughput ratio isolates
the attention. Training runs on the CPU, resumable from checkpoints, half the steps under the span masks (so the
model works under both) and half dense.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantpredict.attention.arith import (
    DEFAULT_WIDTH,
    ArithTokenizer,
    SpanTracker,
    max_operands,
    span_starts,
    training_batch,
)
from quantpredict.attention.kernels import sparse_decode_attention
from quantpredict.attention.masks import starts_to_block_mask
from quantpredict.errors import ModelError
from quantpredict.threads import torch_threads

DEFAULT_DIR = Path("data/attention")
BLOCK_SIZE = 32
# No sink block: lines are block-aligned, so "previous line + current line" looks the same at every depth of the trace
# (RoPE is relative) and a model trained on short traces under the masks sees nothing new on long ones.
SINK_BLOCKS = 0


@dataclass(frozen=True)
class ArithModelSpec:
    """Size of the task model and the task's line width (tokens per line)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 192
    width: int = DEFAULT_WIDTH
    max_positions: int = 4096


def build_model(spec: ArithModelSpec, seed: int = 0) -> LlamaForCausalLM:
    tok = ArithTokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                      max_position_embeddings=spec.max_positions, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


# ----------------------------------------------------------------------------------------------------------- forward
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward(model: LlamaForCausalLM, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full-sequence logits ``[B, T, V]`` through the model's own modules; ``attn_mask``: bool ``[T, T]`` (True =
    attend) or None for causal. Equals ``model(ids).logits`` with no mask (tested)."""
    inner = model.model
    B, T = ids.shape
    h = inner.embed_tokens(ids)
    pos = torch.arange(T)[None].expand(B, -1)
    cos, sin = inner.rotary_emb(h, pos)
    for layer in inner.layers:
        att = layer.self_attn
        x = layer.input_layernorm(h)
        hd = att.head_dim
        q = att.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
        k = att.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = att.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if attn_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        h = h + att.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def span_mask(ids: torch.Tensor, tok: ArithTokenizer, block_size: int = BLOCK_SIZE,
              sink_blocks: int = SINK_BLOCKS) -> torch.Tensor:
    """The block-sparse bool ``[T, T]`` mask the sparse decoder uses for the trace ``ids`` (``[T]``)."""
    return starts_to_block_mask(span_starts(ids.tolist(), tok), block_size, sink_blocks=sink_blocks).token_mask()


# ----------------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    minutes: float = 25.0
    seed: int = 0
    threads: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    tokens_per_step: int = 1024
    min_operands: int = 2
    max_operands: int = 47
    masked_fraction: float = 0.5
    checkpoint_seconds: float = 120.0


def _lr(cfg: TrainConfig, step: int, frac: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_arith(out_dir: Path = DEFAULT_DIR, cfg: TrainConfig = TrainConfig(), spec: ArithModelSpec = ArithModelSpec(),
                log: Callable[[str], None] = print) -> Path:
    """Train (or resume) the task model for ``cfg.minutes`` of wall time; saves ``model.safetensors`` + ``config.json``
    + ``arith.json`` under ``out_dir`` and a resumable ``checkpoint.pt`` every ``checkpoint_seconds``."""
    with torch_threads(cfg.threads):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok = ArithTokenizer()
        model = build_model(spec, cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
        ckpt = out_dir / "checkpoint.pt"
        step, elapsed, rng = 0, 0.0, random.Random(cfg.seed)
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step, elapsed = state["step"], state["elapsed"]
            rng.setstate(state["rng"])
            log(f"resumed at step {step}, {elapsed / 60:.1f} min")
        budget = cfg.minutes * 60
        masks: dict[int, torch.Tensor] = {}
        t0, last_ckpt, ema = time.time() - elapsed, time.time(), None
        model.train()
        while time.time() - t0 < budget:
            # short traces are cheap and teach the same fixed-offset rules; a few long ones teach dense attention to
            # ignore a long past
            hi = min(cfg.max_operands, max_operands(spec.width))
            n = cfg.min_operands + int((hi - cfg.min_operands + 1) * rng.random() ** 2)
            T = n * spec.width + 1
            batch = training_batch(n, max(1, cfg.tokens_per_step // T), rng, tok, spec.width)
            mask = None
            if rng.random() < cfg.masked_fraction:
                if n not in masks:  # the span structure depends only on n (fixed-width lines)
                    masks[n] = span_mask(batch[0], tok)
                mask = masks[n][:-1, :-1]
            logits = forward(model, batch[:, :-1], mask)
            # the question line is given, not predicted
            target = batch[:, 1:].clone()
            target[:, : spec.width - 1] = -100
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step, (time.time() - t0) / budget)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 25 == 0:
                log(f"step {step} n={n} loss {loss.item():.4f} ema {ema:.4f} t={(time.time() - t0) / 60:.1f}min")
            if time.time() - last_ckpt > cfg.checkpoint_seconds:
                _checkpoint(ckpt, model, opt, step, time.time() - t0, rng)
                last_ckpt = time.time()
        _checkpoint(ckpt, model, opt, step, time.time() - t0, rng)
        save_model(model, out_dir, spec, {"steps": step, "minutes": (time.time() - t0) / 60, **asdict(cfg)})
        log(f"done: {step} steps, saved to {out_dir}")
        return out_dir


def _checkpoint(path: Path, model, opt, step: int, elapsed: float, rng: random.Random) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "rng": rng.getstate()}, tmp)
    tmp.replace(path)


def save_model(model: LlamaForCausalLM, out_dir: Path, spec: ArithModelSpec, train_info: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(Path(out_dir) / "model.safetensors"))
    from quantpredict.files import honour_umask

    honour_umask(Path(out_dir) / "model.safetensors")  # safetensors writes 0600, like no other file here
    (Path(out_dir) / "arith.json").write_text(json.dumps({"spec": asdict(spec), "train": train_info}, indent=1))


def load_model(model_dir: Path = DEFAULT_DIR) -> tuple[LlamaForCausalLM, ArithModelSpec]:
    """The trained task model (``model.safetensors`` + ``arith.json``), in eval mode."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta, weights = model_dir / "arith.json", model_dir / "model.safetensors"
    if not meta.exists() or not weights.exists():
        raise ModelError(f"no trained arithmetic model in {model_dir}: run `quantpredict attention train-arith` first")
    spec = ArithModelSpec(**json.loads(meta.read_text())["spec"])
    model = build_model(spec)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ModelError(f"{weights}: weights do not match the task model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval(), spec


# ----------------------------------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class GenerationResult:
    """Greedy generations of a batch: ``tokens`` per row (prompt included, up to and including ``<eos>``),
    ``seconds`` of wall time for the whole batch, ``cpu_seconds`` of the calling thread's CPU time, ``density``:
    attended keys over causal keys averaged over every decoding step and row (1.0 for dense), ``new_tokens``:
    decoded tokens (all rows, up to each row's ``<eos>``), ``logits`` ``[B, steps, V]`` when asked for."""

    tokens: list[list[int]]
    seconds: float
    density: float
    new_tokens: int
    logits: torch.Tensor | None = None
    cpu_seconds: float = 0.0


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompts: torch.Tensor, max_len: int, *, sparse: bool,
             block_size: int = BLOCK_SIZE, sink_blocks: int = SINK_BLOCKS, forced: torch.Tensor | None = None,
             keep_logits: bool = False) -> GenerationResult:
    """Greedy decoding of ``prompts`` (``[B, P]``, all of the same length) up to ``max_len`` tokens per row.

    ``forced`` (``[B, L]``): teacher forcing, feed these tokens instead of the greedy picks (tests compare the
    decoder's logits, kept with ``keep_logits`` as ``[B, steps, V]``, with the full-sequence :func:`forward`).

    Dense: every step attends the whole cache. Sparse: each row's span (from the markers it emitted, via
    :class:`~quantpredict.attention.arith.SpanTracker`) -> its attended blocks (the sink block, the span's blocks and
    the current block) -> :func:`sparse_decode_attention`. The prompt is prefilled densely in both (the question line
    attends itself causally, which is its span anyway).
    """
    tok = ArithTokenizer()
    inner = model.model
    B, P = prompts.shape
    cap = -(-max_len // block_size) * block_size
    att0 = inner.layers[0].self_attn
    H, hd = model.config.num_key_value_heads, att0.head_dim
    kc = [torch.zeros(B, H, cap, hd) for _ in inner.layers]
    vc = [torch.zeros(B, H, cap, hd) for _ in inner.layers]
    workspaces: list[dict[str, torch.Tensor]] = [{} for _ in inner.layers]  # gather buffers, one set per layer
    trackers = [SpanTracker(tok) for _ in range(B)]
    out = [list(map(int, row)) for row in prompts]
    done = [False] * B
    dens_sum, dens_n, new = 0.0, 0, 0
    t0, c0 = time.perf_counter(), time.thread_time()
    # prefill
    ids = prompts
    pos = torch.arange(P)[None].expand(B, -1)
    for tr, row in zip(trackers, prompts):
        for t in row:
            tr.push(int(t))
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, pos)
    for li, layer in enumerate(inner.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q = att.q_proj(x).view(B, P, -1, hd).transpose(1, 2)
        k = att.k_proj(x).view(B, P, -1, hd).transpose(1, 2)
        v = att.v_proj(x).view(B, P, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kc[li][:, :, :P], vc[li][:, :, :P] = k, v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + att.o_proj(o.transpose(1, 2).reshape(B, P, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(inner.norm(h[:, -1]))
    kept = [logits] if keep_logits else []
    nxt = logits.argmax(-1)
    length = P
    while length < max_len and not all(done):
        if forced is not None:
            if length - P >= forced.shape[1]:
                break
            nxt = forced[:, length - P]
        p = length  # position of the token being fed
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                new += 1
                done[b] = t == tok.eos_id
        block_index = None
        if sparse:
            last = p // block_size
            firsts = [trackers[b].push(t) // block_size for b, t in enumerate(nxt.tolist())]
            for first in firsts:
                # keys read: the sink blocks before the span (all full, as they precede the current block) + the
                # span's blocks up to the current position
                dens_sum += (min(sink_blocks, first) * block_size + p + 1 - first * block_size) / (p + 1)
            # a row reads sink blocks [0, min(sink, first)) and span blocks [first, last]: one contiguous run when the
            # span starts inside the sink or there is no sink
            if all(f == firsts[0] for f in firsts) and (firsts[0] <= sink_blocks or sink_blocks == 0):
                block_index = range(0 if firsts[0] <= sink_blocks else firsts[0], last + 1)  # a view of the cache
            else:
                rows = [list(range(min(sink_blocks, f))) + list(range(f, last + 1)) for f in firsts]
                n = max(len(r) for r in rows)
                block_index = torch.tensor([r + [-1] * (n - len(r)) for r in rows])
        else:
            dens_sum += B
        dens_n += B
        h = inner.embed_tokens(nxt[:, None])
        cos, sin = inner.rotary_emb(h, torch.full((B, 1), p))
        for li, layer in enumerate(inner.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            k = att.k_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            v = att.v_proj(x).view(B, 1, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc[li][:, :, p], vc[li][:, :, p] = k[:, :, 0], v[:, :, 0]
            if sparse:
                o = sparse_decode_attention(q[:, :, 0], kc[li], vc[li], block_index, block_size=block_size,
                                            kv_len=p + 1, workspace=workspaces[li])
            else:
                o = F.scaled_dot_product_attention(q, kc[li][:, :, : p + 1], vc[li][:, :, : p + 1])[:, :, 0]
            h = h + att.o_proj(o.reshape(B, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(inner.norm(h[:, -1]))
        if keep_logits:
            kept.append(logits)
        nxt = logits.argmax(-1)
        length += 1
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return GenerationResult(out, seconds, dens_sum / max(dens_n, 1), new,
                            torch.stack(kept, 1) if keep_logits else None, cpu)
