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
from quantpredict.threads import torch_threads

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
    from quantpredict.files import honour_umask

    honour_umask(*out.glob("*.safetensors"))  # safetensors writes 0600; the other files get the umask's mode
    tokenizer.save_pretrained(str(out))
    (out / "zoo_card.json").write_text(json.dumps(card, indent=2) + "\n")


def link_shared_tokenizer(model_dir: Path, shared: Path) -> bool:
    """Replace ``model_dir/tokenizer.json`` by a relative symlink to ``shared/tokenizer.json`` when the two are
    byte-identical; returns whether it linked. Every long-trained checkpoint carries the zoo's tokenizer, and the
    264 KB file ten times over was an eighth of what the long zoo added to the tracked tree; through the link the
    directory still loads with ``from_pretrained``."""
    import os

    own, target = model_dir / "tokenizer.json", shared / "tokenizer.json"
    if own.is_symlink() or not own.is_file() or not target.is_file() or own.read_bytes() != target.read_bytes():
        return False
    tmp = own.with_name("tokenizer.json.link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, model_dir))
    tmp.replace(own)
    return True


def _model_and_optimizer(spec: ZooSpec, tokenizer, ckpt: Path):
    """A fresh seeded model of ``spec`` and its AdamW (the zoo's settings), resumed from ``ckpt`` when it exists:
    ``(model, optimizer, step, seconds trained so far)``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(make_config(spec, len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
    return model, opt, step, seconds


def train_model(spec: ZooSpec, tokenizer, train_ids: torch.Tensor, *, ckpt_dir: Path, out_root: Path,
                ckpt_every: int = 100, stop_after: int | None = None) -> None:
    """Train ``spec`` from scratch (or resume its checkpoint) and save it and its snapshots under ``out_root``.

    ``stop_after`` ends the run after that many steps without saving the model (as an interruption would), so
    that resuming can be tested.
    """
    from quantpredict import arch

    ckpt = ckpt_dir / f"{spec.name}.pt"
    model, opt, step, seconds = _model_and_optimizer(spec, tokenizer, ckpt)
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

    with torch_threads(threads):
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


# ---- long-trained checkpoints (WSD schedule) ---------------------------------------------------------------------

LONG_CORPUS: tuple[tuple[str, str], ...] = (("wikitext2", "train"), ("tinyshakespeare", "train"))


@dataclass(frozen=True)
class LongRun:
    """One long training run of a zoo architecture, saved at several token budgets as models ``<base>-d<NN>``.

    ``NN`` is the budget in training tokens per non-embedding parameter. The schedule is warmup-stable-decay (WSD,
    as SmolLM2 and MiniCPM were trained): one run at constant learning rate, and at each budget a branch whose last
    ``cooldown`` fraction of the budget decays the rate to 0.1x (the zoo's cosine floor). Every saved checkpoint is
    therefore annealed like the base zoo models, and the budgets share one stable trajectory (about 1.3x the tokens
    of the largest budget in all, instead of the sum of the budgets).
    """

    base: str  # zoo model whose architecture, width, depth and seed it shares
    tokens_per_param: tuple[int, ...]  # budgets, ascending
    cooldown: float = 0.2

    @property
    def spec(self) -> ZooSpec:
        return next(s for s in zoo_specs() if s.name == self.base)

    def names(self) -> list[str]:
        return [f"{self.base}-d{t}" for t in self.tokens_per_param]


def long_runs() -> list[LongRun]:
    """The long-trained zoo: xs of three families to 300 tokens/parameter, s of one to 100 (12 checkpoints; every
    CPU-hour on this machine is shared with the sweeps, so no second s family). llama-s saves at 10 tokens/parameter
    on the way, so that a run stopped early still gives the s size a long-trained point."""
    return [
        LongRun("llama-xs", (30, 100, 300)),
        LongRun("opt-xs", (30, 100, 300)),
        LongRun("gpt2-xs", (30, 100, 300)),
        LongRun("llama-s", (10, 30, 100)),
    ]


def _long_lr(spec: ZooSpec, step: int, *, cooldown_start: int | None = None, cooldown_steps: int = 0) -> float:
    warmup = max(1, spec.steps // 20)  # the base model's warmup, so the first steps match it
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    if cooldown_start is None or step < cooldown_start:
        return spec.lr
    progress = min(1.0, (step - cooldown_start) / max(1, cooldown_steps))
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def long_corpus_ids(tokenizer) -> tuple[torch.Tensor, dict]:
    """The long runs' training stream (every text of :data:`LONG_CORPUS`, concatenated) and its token counts."""
    from quantpredict.data import token_ids

    parts = {f"{name}/{split}": token_ids(tokenizer, name, split) for name, split in LONG_CORPUS}
    return torch.cat(list(parts.values())), {k: int(v.numel()) for k, v in parts.items()}


def _train_steps(model, opt, spec: ZooSpec, ids: torch.Tensor, first: int, last: int, lr_of, *, bar,
                 on_step=None) -> float:
    """Optimizer steps ``first .. last-1`` (data of step k is a pure function of (seed, k)); the last loss."""
    loss_value = float("nan")
    for step in range(first, last):
        starts = _batch_starts(spec.seed, step, ids.numel())
        x = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_of(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_step is not None:
            on_step(step + 1)
    return loss_value


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a kill mid-save leaves the previous checkpoint intact


# ---- the committed resume state of a long run ---------------------------------------------------------------------
# The full resume state (fp32 weights and both AdamW moments, 4-9 MB per run) stays on the training machine. What is
# committed is a compact one, about a quarter of the bytes: the weights in bf16 (as the zoo's checkpoints are), the
# step and the seconds. The moments are not stored but re-estimated on resume, with the weights frozen, over the
# MOMENT_STEPS batches that preceded the resume point (the same batches the run saw). With beta2 = 0.95 the second
# moment forgets its history in ~20 steps, so 100 steps reconstruct it (1 - 0.95^100 = 99.4% of its weight); the
# state's step count restarts at 100, so Adam's bias corrections stay exact for the moments actually held.

RESUME_FORMAT = "quantpredict-long-resume-1"
MOMENT_STEPS = 100


def resume_path(ckpt_dir: Path, base: str) -> Path:
    """The compact (committed) resume state of ``base``'s long run: ``<ckpt_dir>/<base>-long.resume.safetensors``."""
    return ckpt_dir / f"{base}-long.resume.safetensors"


def save_resume_state(model, step: int, seconds: float, path: Path) -> None:
    """Write the compact resume state (bf16 weights, each tied tensor once; step and seconds in the metadata),
    atomically."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    state = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:  # a tied weight (lm_head = embedding): stored once, re-tied on load
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().to(torch.bfloat16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": RESUME_FORMAT, "step": str(int(step)),
                                         "seconds": f"{seconds:.1f}"})
    tmp.replace(path)


def load_resume_state(model, path: Path) -> tuple[int, float]:
    """Load a compact resume state into ``model`` (bf16 -> the model's dtype); returns ``(step, seconds)``.

    Raises ``ValueError`` when the file is not one, or does not fit the model (a key missing that is not tied to a
    stored one, or an unexpected key)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a long-run resume state (format {meta.get('format')!r}, expected "
                         f"{RESUME_FORMAT!r}); delete it to train the run from scratch")
    state = load_file(str(path))
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    stored_ptrs = {own[k].data_ptr() for k in state if k in own}
    if unexpected or any(own[k].data_ptr() not in stored_ptrs for k in missing):
        raise ValueError(f"{path} does not fit the model: unexpected {sorted(unexpected)}, missing "
                         f"{sorted(k for k in missing if own[k].data_ptr() not in stored_ptrs)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    return int(meta["step"]), float(meta["seconds"])


def reestimate_moments(model, opt, spec: ZooSpec, ids: torch.Tensor, step: int) -> int:
    """Rebuild AdamW's moments at ``step`` without moving the weights: optimizer steps at learning rate 0 (no
    update, no weight decay) on the batches of steps ``step - k .. step - 1``, ``k = min(MOMENT_STEPS, step)``.
    Returns ``k``."""
    k = min(MOMENT_STEPS, step)
    bar = tqdm(total=k, desc=f"{spec.name} moments", unit="step", mininterval=10)
    _train_steps(model, opt, spec, ids, step - k, step, lambda _: 0.0, bar=bar)
    bar.close()
    return k


def train_long(run: LongRun, tokenizer, *, ckpt_dir: Path, out_root: Path, ckpt_every: int = 200,
               evaluate: bool = True) -> list[str]:
    """Train ``run`` (resuming its checkpoints) and save every budget not on disk yet; returns the names saved.

    Resumable at any step: ``<ckpt_dir>/<base>-long.pt`` holds the stable trajectory, and ``<name>.cooldown.pt`` a
    branch in progress. Where neither is (a fresh clone), the committed compact state of the stable trajectory,
    ``<base>-long.resume.safetensors`` (:func:`save_resume_state`), resumes it: bf16 weights, moments re-estimated
    (:func:`reestimate_moments`) -- close to, not bit-identical with, the uninterrupted run.
    """
    import copy

    from quantpredict import arch

    spec = run.spec
    ids, corpus_tokens = long_corpus_ids(tokenizer)
    main_ckpt = ckpt_dir / f"{run.base}-long.pt"
    compact = resume_path(ckpt_dir, run.base)
    model, opt, step, seconds = _model_and_optimizer(spec, tokenizer, main_ckpt)
    if not main_ckpt.exists() and compact.exists():  # a fresh machine: only the committed state is here
        step, seconds = load_resume_state(model, compact)
        reestimate_moments(model, opt, spec, ids, step)
    n_nonembed = arch.non_embedding_parameters(model)
    tokens_per_step = BATCH * SEQ_LEN
    saved: list[str] = []
    t0 = time.time() - seconds
    model.train()

    def save_main(at: int) -> None:
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": at,
                      "seconds": time.time() - t0}, main_ckpt)
        save_resume_state(model, at, time.time() - t0, compact)

    for tpp, name in zip(run.tokens_per_param, run.names()):
        total_steps = int(round(tpp * n_nonembed / tokens_per_step))
        cd_steps = int(round(run.cooldown * total_steps))
        branch_at = total_steps - cd_steps
        if (out_root / name / "model.safetensors").exists():
            continue
        if step > branch_at:
            raise RuntimeError(f"{main_ckpt} is at step {step}, past {name}'s branch point {branch_at}, but {name} "
                               f"is not on disk; delete {main_ckpt} to retrain {run.base}'s long run from scratch")
        if step < branch_at:  # stable phase up to this budget's branch point
            bar = tqdm(total=branch_at, initial=step, desc=f"{run.base} stable", unit="step", mininterval=10)
            _train_steps(model, opt, spec, ids, step, branch_at, lambda k: _long_lr(spec, k), bar=bar,
                         on_step=lambda k: save_main(k) if k % ckpt_every == 0 else None)
            bar.close()
            step = branch_at
            save_main(step)
        # the cooldown branch, from the stable state at branch_at (resumed from its own checkpoint if one exists)
        stable_model, stable_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        cd_ckpt = ckpt_dir / f"{name}.cooldown.pt"
        k = branch_at
        if cd_ckpt.exists():
            state = torch.load(cd_ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            k = int(state["step"])
        bar = tqdm(total=total_steps, initial=k, desc=f"{name} cooldown", unit="step", mininterval=10)

        def save_cd(at: int, path: Path = cd_ckpt) -> None:
            if at % ckpt_every == 0:
                _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": at}, path)

        def cd_lr(s: int, start: int = branch_at, n: int = cd_steps) -> float:
            return _long_lr(spec, s, cooldown_start=start, cooldown_steps=n)

        loss = _train_steps(model, opt, spec, ids, k, total_steps, cd_lr, bar=bar, on_step=save_cd)
        bar.close()
        model.eval()
        card = _card(spec, model, name, total_steps, time.time() - t0, arch=arch)
        card.update({
            "long_run_of": run.base,
            "tokens_per_param": round(total_steps * tokens_per_step / n_nonembed, 1),
            "schedule": f"WSD: constant lr {spec.lr:.3g} after {max(1, spec.steps // 20)} warmup steps, cosine "
                        f"decay to 0.1x over the last {run.cooldown:.0%} of the budget (steps {branch_at}-"
                        f"{total_steps}); branched from one shared stable run",
            "corpus": corpus_tokens,
            "epochs": round(total_steps * tokens_per_step / ids.numel(), 2),
            "final_train_loss": round(loss, 4),
            "regularization": "AdamW weight decay 0.1, gradient clip 1.0, no dropout, no early stopping "
                              "(valid perplexity is on this card)",
        })
        save_model_dir(model, tokenizer, out_root / name, card)
        link_shared_tokenizer(out_root / name, out_root / "tokenizer")
        saved.append(name)
        if evaluate:
            evaluate_cards([name])
        cd_ckpt.unlink(missing_ok=True)
        model.train()
        model.load_state_dict(stable_model)
        opt.load_state_dict(stable_opt)
    return saved


def build_long(names: list[str] | None = None, *, threads: int | None = None, evaluate: bool = True) -> list[str]:
    """Train the long runs (all, or those whose base or checkpoint name is in ``names``); resumable."""
    from quantpredict.models.tokenizer import load_or_train_tokenizer

    with torch_threads(threads):
        root = zoo_root()
        tok = load_or_train_tokenizer(root / "tokenizer")
        saved = []
        for run in long_runs():
            if names is not None and run.base not in names and not set(run.names()) & set(names):
                continue
            saved += train_long(run, tok, ckpt_dir=root / "_long", out_root=root, evaluate=evaluate)
        return saved
