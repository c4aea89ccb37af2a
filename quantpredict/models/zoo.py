"""The model zoo: small causal LMs of four standard Hugging Face architectures, trained on WikiText-2 train.

Every model is defined by a :class:`ZooSpec` (family, width, depth, token budget, seed). ``build_zoo`` trains the
missing ones from scratch, deterministically for a fixed thread count, with resumable checkpoints, then writes
each model directory (bf16 safetensors, config, tokenizer, ``zoo_card.json``). Partially trained snapshots of
two Llama sizes (1/4 and 1/2 of their token budget) are saved as models of their own: longer-trained models
quantize worse, and the predictor needs that axis.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantpredict.data import data_dir

SEQ_LEN = 256
BATCH = 8
HEAD_DIM = 32


@dataclass(frozen=True)
class ZooSpec:
    name: str
    family: str  # llama | opt | gpt2 | gpt_neox
    hidden: int
    layers: int
    tokens: int  # training tokens
    seed: int = 0
    snapshots: tuple[float, ...] = ()  # fractions of `tokens` saved as models "<name>-t<pct>"

    @property
    def lr(self) -> float:
        return 3e-3 * math.sqrt(64 / self.hidden)

    @property
    def steps(self) -> int:
        return self.tokens // (BATCH * SEQ_LEN)


_SIZES = {  # size -> (hidden, layers, tokens)
    "xs": (64, 2, 1_000_000),
    "s": (96, 3, 1_500_000),
    "m": (128, 4, 2_000_000),
    "l": (192, 4, 2_400_000),
}
FAMILIES = ("llama", "opt", "gpt2", "gpt_neox")


def zoo_specs() -> list[ZooSpec]:
    """Every trained zoo model, smallest first within each family (training order: by size, then family)."""
    specs = []
    for size, (hidden, layers, tokens) in _SIZES.items():
        for fam in FAMILIES:
            snaps = (0.25, 0.5) if fam == "llama" and size in ("s", "m") else ()
            specs.append(ZooSpec(f"{fam}-{size}", fam, hidden, layers, tokens, seed=0, snapshots=snaps))
    return specs


def zoo_root() -> Path:
    return data_dir() / "zoo"


def make_config(spec: ZooSpec, vocab_size: int):
    """A transformers config for ``spec``: the real family's architecture, dropout off, tied embeddings."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    d, L, heads = spec.hidden, spec.layers, spec.hidden // HEAD_DIM
    ids = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    if spec.family == "llama":  # RMSNorm, SwiGLU, RoPE
        inter = int(round(8 * d / 3 / 16)) * 16
        return LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=512, **ids)
    if spec.family == "opt":  # LayerNorm, ReLU, learned positions
        return OPTConfig(hidden_size=d, ffn_dim=4 * d, num_hidden_layers=L, num_attention_heads=heads,
                         max_position_embeddings=512, word_embed_proj_dim=d, dropout=0.0, attention_dropout=0.0,
                         activation_function="relu", do_layer_norm_before=True, **ids)
    if spec.family == "gpt2":  # Conv1D projections, GELU, learned positions
        return GPT2Config(n_embd=d, n_layer=L, n_head=heads, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **ids)
    if spec.family == "gpt_neox":  # fused QKV, partial rotary, parallel residual
        return GPTNeoXConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=L, num_attention_heads=heads,
                             max_position_embeddings=512, rotary_pct=0.25, use_parallel_residual=True,
                             hidden_dropout=0.0, attention_dropout=0.0, **ids)
    raise ValueError(f"unknown zoo family {spec.family!r}")


def _batch_starts(seed: int, step: int, n_tokens: int) -> torch.Tensor:
    # One generator per step: the data order is a pure function of (seed, step), so a resumed run sees the same.
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - SEQ_LEN - 1, (BATCH,), generator=g)


def _lr_at(spec: ZooSpec, step: int) -> float:
    warmup = max(1, spec.steps // 20)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_model_dir(model, tokenizer, out: Path, card: dict) -> None:
    """Write an HF model directory (bf16 safetensors) with its tokenizer and zoo_card.json."""
    out.mkdir(parents=True, exist_ok=True)
    # Save a bf16 copy: rounding the live model would change the rest of its training.
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "zoo_card.json").write_text(json.dumps(card, indent=2) + "\n")


def train_model(spec: ZooSpec, tokenizer, train_ids: torch.Tensor, *, ckpt_dir: Path, out_root: Path,
                ckpt_every: int = 100, stop_after: int | None = None) -> None:
    """Train ``spec`` from scratch (or resume its checkpoint) and save it and its snapshots under ``out_root``.

    ``stop_after`` ends the run after that many steps without saving the model (as an interruption would), so
    that resuming can be tested.
    """
    from transformers import AutoModelForCausalLM

    from quantpredict import arch

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(make_config(spec, len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt = ckpt_dir / f"{spec.name}.pt"
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
    snap_steps = {int(round(f * spec.steps)): f for f in spec.snapshots}
    model.train()
    bar = tqdm(total=spec.steps, initial=step, desc=f"train {spec.name}", unit="step", mininterval=5)
    t0 = time.time() - seconds
    while step < spec.steps:
        starts = _batch_starts(spec.seed, step, train_ids.numel())
        x = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(spec, step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step in snap_steps:
            frac = snap_steps[step]
            name = f"{spec.name}-t{int(frac * 100)}"
            model.eval()
            save_model_dir(model, tokenizer, out_root / name,
                           _card(spec, model, name, step, time.time() - t0, snapshot_of=spec.name, arch=arch))
            model.train()
        if step % ckpt_every == 0 or step == spec.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "seconds": time.time() - t0}, tmp)
            tmp.replace(ckpt)  # atomic: a kill mid-save leaves the previous checkpoint intact
        if stop_after is not None and step >= stop_after:
            bar.close()
            return
    bar.close()
    model.eval()
    save_model_dir(model, tokenizer, out_root / spec.name,
                   _card(spec, model, spec.name, step, time.time() - t0, arch=arch))


def _card(spec: ZooSpec, model, name: str, step: int, seconds: float, *, arch, snapshot_of: str | None = None):
    return {
        "name": name,
        "family": spec.family,
        "n_params_nonembed": arch.non_embedding_parameters(model),
        "n_params_total": sum(p.numel() for p in model.parameters()),
        "hidden_size": spec.hidden,
        "layers": spec.layers,
        "heads": spec.hidden // HEAD_DIM,
        "tokens_trained": step * BATCH * SEQ_LEN,
        "train_steps": step,
        "train_seconds": round(seconds, 1),
        "snapshot_of": snapshot_of,
        "spec": asdict(spec),
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "lr": spec.lr,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def build_zoo(names: list[str] | None = None, *, threads: int | None = None, evaluate: bool = True) -> list[str]:
    """Train every zoo model (or those in ``names``) whose directory is missing, then fill in missing perplexities.

    Returns the names trained. Safe to interrupt: rerunning resumes from the last checkpoint.
    """
    from quantpredict.models.tokenizer import load_or_train_tokenizer

    if threads:
        torch.set_num_threads(threads)
    root = zoo_root()
    tok = load_or_train_tokenizer(root / "tokenizer")
    specs = [s for s in zoo_specs() if names is None or s.name in names]
    todo = [s for s in specs if not (root / s.name / "model.safetensors").exists()]
    trained = []
    if todo:
        from quantpredict.data import token_ids

        train_ids = token_ids(tok, "wikitext2", "train")
        for spec in todo:
            train_model(spec, tok, train_ids, ckpt_dir=root / "_ckpt", out_root=root)
            trained.append(spec.name)
    if evaluate:
        evaluate_cards([s.name for s in specs] + [f"{s.name}-t{int(f * 100)}" for s in specs for f in s.snapshots])
    return trained


def evaluate_cards(names: list[str], seq_len: int = SEQ_LEN) -> None:
    """Measure WikiText-2 valid and test perplexity for every card that lacks them (from the saved weights)."""
    from quantpredict.evaluate import perplexity
    from quantpredict.models import load

    for name in names:
        card_path = zoo_root() / name / "zoo_card.json"
        if not card_path.exists():
            continue
        card = json.loads(card_path.read_text())
        if "test_ppl" in card:
            continue
        model, tok = load(name)
        for split in ("valid", "test"):
            res = perplexity(model, tok, split=split, seq_len=seq_len)
            card[f"{split}_ppl"] = round(float(res), 3)
            card[f"{split}_nll"] = round(res.nll, 5)
            card[f"{split}_nll_se"] = round(res.nll_se, 5)
            card[f"{split}_tokens"] = res.tokens
            card[f"{split}_eval_seconds"] = round(res.seconds, 2)
        card["eval_seq_len"] = seq_len
        card_path.write_text(json.dumps(card, indent=2) + "\n")
