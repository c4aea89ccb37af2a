"""The table of adapters: where each supported architecture keeps its parts, one :class:`Adapter` row per
model type and config layout (``ADAPTERS``); a new architecture is one entry here.

Supported model types (``config.model_type``), each one or more :class:`Adapter` rows of ``ADAPTERS``:

* ``llama``, ``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (per-head q/k norms): pre-norm RMSNorm blocks.
* ``gemma``, ``gemma2``, ``gemma3_text`` (what ``Gemma3ForCausalLM`` holds): RMSNorm computes ``x_hat * (1 + w)``
  (``norm_offset=1``), so SmoothQuant's fold is ``w -> (1 + w) / s - 1``. Gemma-2/3 "sandwich" their branches:
  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` normalize the branch *outputs* and feed no linear;
  ``input_layernorm`` feeds q/k/v and ``pre_feedforward_layernorm`` feeds gate/up. Final logits are soft-capped.
* ``phi3``: fused ``qkv_proj`` and ``gate_up_proj``.
* ``opt``, ``gpt2`` (``Conv1D``, fused ``c_attn``), ``bloom`` (fused ``query_key_value``, ALiBi), ``stablelm``
  (LayerNorm with bias; parallel residual as a config option).
* Parallel blocks, one norm feeding attention and MLP (one SmoothQuant pair, one scale for both branches):
  ``gptj``, ``phi`` (Phi-1/1.5/2), ``falcon`` (7B layout; also its sequential, Falcon-40B two-norm and one-norm
  layouts, chosen from the config), ``stablelm`` with ``use_parallel_residual``. ``gpt_neox`` runs its branches in
  parallel too, but each behind its own norm (two pairs).
* ``olmo2`` normalizes after attention and MLP (post-norm): no norm feeds a linear, so SmoothQuant raises
  :class:`~quantpredict.errors.UnsupportedArchitectureError` for it, as for ``bloom`` with
  ``apply_residual_connection_post_layernorm`` (the norm's output is also the residual).

Any other model type is walked generically (:mod:`quantpredict.arch.generic`). Refused outright, with the reason
(``REFUSED``): mixture-of-experts types and composite (multimodal) models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# The table is data: it imports neither torch nor transformers, so that a command which reads a checkpoint's files
# without building the model (quantpredict.quantize.direct) can use it. LINEAR_TYPES lives in arch.generic.


class GenericArchitectureWarning(UserWarning):
    """A model type without an adapter, walked generically (:func:`~quantpredict.arch.generic.generic_adapter`); says
    what the walk found."""


Condition = tuple[str, tuple[Any, ...]]  # (config attribute, the values it may take)


@dataclass(frozen=True)
class LinearFold:
    """A linear whose outputs feed ``nexts`` through per-channel operations only, so that AWQ can fold ``1/s`` into
    its output rows and ``s`` into the input columns of ``nexts`` (as AutoAWQ's ``v_proj -> o_proj`` and
    ``up_proj -> down_proj``).

    ``parts``: ``prev``'s outputs split into that many equal chunks and the *last* one feeds ``nexts`` (fused
    ``c_attn``/``qkv_proj``: 3, value last; fused ``gate_up_proj``: 2, up last); the fold applies only when
    ``prev.out_features == parts * next.in_features`` (with grouped-query attention v is narrower than o's input
    and the fold is skipped, as AutoAWQ does). ``when``: config conditions for it to be exact (OPT's fc1 -> fc2 only
    through a ReLU, which commutes with positive scales).
    """

    prev: str
    nexts: tuple[str, ...]
    parts: int = 1
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its parts (attribute paths relative to the model or a block), and what
    SmoothQuant may fold.

    Attributes:
        family: the label stored with runs (the model type).
        blocks: path from the model to the ``nn.ModuleList`` of blocks.
        embeddings: token (and position) embeddings.
        head, final_norm: the LM head and the norm before it.
        linears: per block, in execution order.
        smooth_pairs: norm -> the linears that read its output and nothing else (SmoothQuant folds ``1/s`` into the
            norm and ``s`` into them); a parallel block's shared norm lists the first linear of both branches.
        hidden_size_attr: config attribute holding the model width.
        norm_offset: the block norms compute ``x_hat * (norm_offset + w)`` (Gemma: 1).
        parallel: attention and MLP read the same block input (parallel residual).
        fused: linears that compute several projections at once (q/k/v, gate/up).
        smoothquant_unsupported: why no fold can be exact here (then ``smooth_pairs`` is empty).
        linear_folds: linear -> linear folds AWQ may use besides the norm -> linear pairs (:class:`LinearFold`).
        logit_softcap: config attribute of a ``cap * tanh(logits / cap)`` applied after the head (Gemma-2/3).
        when: the config conditions under which this layout holds (``getattr(config, attr)`` in the values); the
            first row of a model type whose conditions hold is its adapter.
        notes: one line for ``quantpredict zoo list --architectures``.
        generic: built by :func:`generic_adapter`, not taken from the table.
    """

    family: str
    blocks: str
    embeddings: tuple[str, ...]
    head: str
    final_norm: str
    linears: tuple[str, ...]
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    hidden_size_attr: str = "hidden_size"
    norm_offset: float = 0.0
    parallel: bool = False
    fused: tuple[str, ...] = ()
    smoothquant_unsupported: str | None = None
    linear_folds: tuple[LinearFold, ...] = ()
    logit_softcap: str | None = None
    when: tuple[Condition, ...] = ()
    notes: str = ""
    generic: bool = False

    def __post_init__(self) -> None:
        # the table is code: an inconsistent row is a bug, caught at import
        if bool(self.smooth_pairs) == bool(self.smoothquant_unsupported):
            raise ValueError(f"{self.family}: give smooth_pairs or smoothquant_unsupported (exactly one)")
        stray = [p for _, lins in self.smooth_pairs for p in lins if p not in self.linears]
        stray += [p for p in self.fused if p not in self.linears]
        stray += [p for f in self.linear_folds for p in (f.prev, *f.nexts) if p not in self.linears]
        if stray:
            raise ValueError(f"{self.family}: {stray} are not among its linears")
        norms = [n for n, _ in self.smooth_pairs]
        if len(set(norms)) != len(norms):  # two folds into one norm would divide its output twice
            raise ValueError(f"{self.family}: a norm appears in two smooth pairs ({norms}); list its linears once")

    @property
    def smoothquant(self) -> bool:
        return self.smoothquant_unsupported is None

    def matches(self, config: Any) -> bool:
        """Whether ``config`` satisfies every condition of :attr:`when`."""
        return all(getattr(config, attr, None) in values for attr, values in self.when)

    def describe_when(self) -> str:
        return ", ".join(f"{a}={'|'.join(map(str, v))}" for a, v in self.when) or "any config"


def _when(**conditions: Any) -> tuple[Condition, ...]:
    """``_when(parallel_attn=True, num_ln=(2, None))``: conditions as data (a tuple value lists the alternatives)."""
    return tuple((k, v if isinstance(v, tuple) else (v,)) for k, v in conditions.items())


# ---- the table -----------------------------------------------------------------------------------------------------

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LINEARS = (*_QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_PAIRS = (("input_layernorm", _QKV), ("post_attention_layernorm", _GATE_UP))
# AutoAWQ's llama folds: v -> o (skipped at run time under grouped-query attention), up -> down (act(gate) * up)
_LLAMA_FOLDS = (LinearFold("self_attn.v_proj", ("self_attn.o_proj",)), LinearFold("mlp.up_proj", ("mlp.down_proj",)))
_GEMMA_SANDWICH_PAIRS = (("input_layernorm", _QKV), ("pre_feedforward_layernorm", _GATE_UP))


def _llama_like(family: str, smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...] = _LLAMA_PAIRS,
                **fields: Any) -> Adapter:
    """A Llama-layout row: ``model.layers``, q/k/v/o and gate/up/down projections, ``model.norm``."""
    fields.setdefault("linear_folds", _LLAMA_FOLDS)
    return Adapter(family=family, blocks="model.layers", embeddings=("model.embed_tokens",), head="lm_head",
                   final_norm="model.norm", linears=_LLAMA_LINEARS, smooth_pairs=smooth_pairs, **fields)


_FALCON = Adapter(
    family="falcon", blocks="transformer.h", embeddings=("transformer.word_embeddings",), head="lm_head",
    final_norm="transformer.ln_f",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    smooth_pairs=(("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),),
    parallel=True, fused=("self_attention.query_key_value",),
    when=_when(new_decoder_architecture=(False, None), parallel_attn=(True, None)),
    notes="Falcon-7B layout: input_layernorm feeds attention and MLP",
)
_BLOOM = Adapter(
    family="bloom", blocks="transformer.h", embeddings=("transformer.word_embeddings",), head="lm_head",
    final_norm="transformer.ln_f",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    smooth_pairs=(("input_layernorm", ("self_attention.query_key_value",)),
                  ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    fused=("self_attention.query_key_value",),
    when=_when(apply_residual_connection_post_layernorm=(False, None)),
    notes="ALiBi; word_embeddings_layernorm normalizes the embeddings before block 0",
)
_GPT_NEOX = Adapter(
    family="gpt_neox",
    blocks="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in",),
    head="lm_head",
    final_norm="gpt_neox.final_layer_norm",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    smooth_pairs=(
        ("input_layernorm", ("attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    fused=("attention.query_key_value",),
)
_STABLELM = _llama_like("stablelm", notes="LayerNorm with bias")

ADAPTERS: dict[str, tuple[Adapter, ...]] = {
    "llama": (Adapter(
        family="llama",
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        head="lm_head",
        final_norm="model.norm",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
        smooth_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        linear_folds=_LLAMA_FOLDS,
    ),),
    "opt": (Adapter(
        family="opt",
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        head="lm_head",
        final_norm="model.decoder.final_layer_norm",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
        ),
        smooth_pairs=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        linear_folds=(LinearFold("self_attn.v_proj", ("self_attn.out_proj",)),
                      LinearFold("fc1", ("fc2",), when=_when(activation_function="relu"))),
        notes="learned positions; LayerNorm with bias",
    ),),
    "gpt2": (Adapter(
        family="gpt2",
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        head="lm_head",
        final_norm="transformer.ln_f",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        smooth_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        linear_folds=(LinearFold("attn.c_attn", ("attn.c_proj",), parts=3),),
        hidden_size_attr="n_embd",
        fused=("attn.c_attn",),
        notes="Conv1D layers (weights stored [in, out])",
    ),),
    "gpt_neox": (
        replace(_GPT_NEOX, parallel=True, when=_when(use_parallel_residual=(True, None)),
                notes="parallel residual, each branch behind its own norm: two pairs"),
        replace(_GPT_NEOX, when=_when(use_parallel_residual=False)),
    ),
    "mistral": (_llama_like("mistral"),),
    "qwen2": (_llama_like("qwen2", notes="q/k/v biases; per-layer sliding-window masks"),),
    "qwen3": (_llama_like("qwen3", notes="per-head q_norm/k_norm after q/k_proj (not fold targets)"),),
    "gemma": (_llama_like("gemma", norm_offset=1.0, notes="RMSNorm x*(1+w); scaled, tied embeddings"),),
    "gemma2": (_llama_like(
        "gemma2", smooth_pairs=_GEMMA_SANDWICH_PAIRS, norm_offset=1.0, logit_softcap="final_logit_softcapping",
        notes="RMSNorm x*(1+w); post-attention/post-feedforward norms act on branch outputs (no fold)"),),
    "gemma3_text": (_llama_like(
        "gemma3_text", smooth_pairs=_GEMMA_SANDWICH_PAIRS, norm_offset=1.0, logit_softcap="final_logit_softcapping",
        notes="Gemma3ForCausalLM; as gemma2, plus q/k norms and local/global rotary per layer"),),
    "phi3": (Adapter(
        family="phi3", blocks="model.layers", embeddings=("model.embed_tokens",), head="lm_head",
        final_norm="model.norm",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        smooth_pairs=(("input_layernorm", ("self_attn.qkv_proj",)),
                      ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        linear_folds=(LinearFold("self_attn.qkv_proj", ("self_attn.o_proj",), parts=3),
                      LinearFold("mlp.gate_up_proj", ("mlp.down_proj",), parts=2)),
        fused=("self_attn.qkv_proj", "mlp.gate_up_proj")),),
    "olmo2": (_llama_like(
        "olmo2", smooth_pairs=(), linear_folds=(),
        smoothquant_unsupported="OLMo-2 normalizes the attention and MLP outputs (post-norm: "
                                "post_attention_layernorm, post_feedforward_layernorm), so no norm feeds a linear "
                                "directly and there is nowhere to fold 1/s",
        notes="post-norm blocks; q/k norms"),),
    "stablelm": (
        replace(_STABLELM, when=_when(use_parallel_residual=(False, None))),
        replace(_STABLELM, smooth_pairs=(("input_layernorm", (*_QKV, *_GATE_UP)),), parallel=True,
                when=_when(use_parallel_residual=True),
                notes="LayerNorm with bias; parallel residual: input_layernorm feeds attention and MLP"),
    ),
    "falcon": (
        _FALCON,
        replace(_FALCON, smooth_pairs=(("input_layernorm", ("self_attention.query_key_value",)),
                                       ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
                parallel=False, when=_when(new_decoder_architecture=(False, None), parallel_attn=False),
                notes="sequential layout (Falcon-RW)"),
        replace(_FALCON, smooth_pairs=(("ln_attn", ("self_attention.query_key_value",)),
                                       ("ln_mlp", ("mlp.dense_h_to_4h",))),
                when=_when(new_decoder_architecture=True, parallel_attn=(True, None),
                           num_ln_in_parallel_attn=(2, None)),
                notes="Falcon-40B layout: parallel branches behind ln_attn and ln_mlp"),
        replace(_FALCON, when=_when(new_decoder_architecture=True, parallel_attn=(True, None),
                                    num_ln_in_parallel_attn=1),
                notes="new decoder layout with one norm: input_layernorm feeds attention and MLP"),
    ),
    "gptj": (Adapter(
        family="gptj", blocks="transformer.h", embeddings=("transformer.wte",), head="lm_head",
        final_norm="transformer.ln_f",
        linears=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
        smooth_pairs=(("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
        linear_folds=(LinearFold("attn.v_proj", ("attn.out_proj",)),),
        hidden_size_attr="n_embd", parallel=True, notes="ln_1 feeds attention and MLP"),),
    "bloom": (
        _BLOOM,
        replace(_BLOOM, smooth_pairs=(), when=_when(apply_residual_connection_post_layernorm=True),
                smoothquant_unsupported="apply_residual_connection_post_layernorm makes each norm's output the "
                                        "residual too, so folding 1/s into a norm would change the model",
                notes="ALiBi; the residual is taken after the norms"),
    ),
    "phi": (Adapter(
        family="phi", blocks="model.layers", embeddings=("model.embed_tokens",), head="lm_head",
        final_norm="model.final_layernorm",
        linears=(*_QKV, "self_attn.dense", "mlp.fc1", "mlp.fc2"),
        smooth_pairs=(("input_layernorm", (*_QKV, "mlp.fc1")),),
        linear_folds=(LinearFold("self_attn.v_proj", ("self_attn.dense",)),),
        parallel=True, notes="Phi-1/1.5/2: input_layernorm feeds attention and MLP"),),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(ADAPTERS)

# model types refused outright, with the reason (the generic walk would quantize them wrongly or partly)
_MOE = ("mixture-of-experts: the experts are 3-D parameters, not linear layers, and need per-expert calibration "
        "on the tokens routed to each")
REFUSED: dict[str, str] = {
    **{t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "dbrx", "deepseek_v2",
                         "deepseek_v3", "granitemoe", "granitemoeshared", "jamba", "gpt_oss", "llama4",
                         "llama4_text", "minimax", "ernie4_5_moe")},
    "gemma3": "a multimodal model (Gemma3ForConditionalGeneration); load its text model with Gemma3ForCausalLM "
              "(model type gemma3_text)",
}


def supported_list() -> str:
    return f"supported families: {', '.join(SUPPORTED_FAMILIES)}"


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def module_at(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def architecture_table() -> list[dict[str, Any]]:
    """One row per adapter (model type and config layout), for ``quantpredict zoo list --architectures``."""
    rows = []
    for model_type, variants in ADAPTERS.items():
        for ad in variants:
            rows.append({
                "model_type": model_type,
                "layout": ad.describe_when(),
                "family": ad.family,
                "smoothquant": ad.smoothquant,
                "smoothquant_note": ad.smoothquant_unsupported or "",
                "parallel_block": ad.parallel,
                "fused_projections": list(ad.fused),
                "awq_linear_folds": [f"{f.prev}->{'+'.join(f.nexts)}" for f in ad.linear_folds],
                "norm": f"x_hat*({ad.norm_offset:g}+w)" if ad.norm_offset else "x_hat*w",
                "linears_per_block": len(ad.linears),
                "notes": ad.notes,
            })
    return rows
