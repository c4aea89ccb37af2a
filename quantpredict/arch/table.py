"""The one place that knows model architectures.

For a Hugging Face causal LM this module gives its transformer blocks, each block's linear layers (weights always
seen as ``[out, in]``, GPT-2's ``Conv1D`` included), the norm -> linear pairs that SmoothQuant folds scales into,
the embedding and the head, and block-by-block execution for calibration. ``quantize``, ``features`` and ``qat``
walk models only through here: a new architecture is one entry in ``_ADAPTERS``.

Supported model types (``config.model_type``), each one or more :class:`Adapter` rows of ``_ADAPTERS``:

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

Any other model type is walked generically (:func:`generic_adapter`, one :class:`GenericArchitectureWarning`
saying what it found): its decoder blocks are the longest ``nn.ModuleList`` of identical blocks holding linears,
their linears are recorded in execution order by hooks on an 8-token dummy forward (module order when that forward
fails), and SmoothQuant is refused (no norm pairs are known). Left out, with a clear error instead:

* mixture-of-experts types (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``phimoe``, ``dbrx``,
  ``deepseek_v2``/``v3``, ``granitemoe``, ``jamba``, ``gpt_oss``, ``llama4`` ...; in general any block holding
  3-D weights): the experts are stored as 3-D parameters, not linear layers, and quantizing them right needs
  per-expert calibration on the tokens routed to each expert, which the block-by-block calibration here lacks;
* composite (multimodal) models, e.g. ``gemma3`` (``Gemma3ForConditionalGeneration``): the longest block list may
  be the vision tower's; load the text model as a causal LM (``Gemma3ForCausalLM``, type ``gemma3_text``).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantpredict.errors import ModelError, UnsupportedArchitectureError

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class GenericArchitectureWarning(UserWarning):
    """A model type without an adapter, walked generically (:func:`generic_adapter`); says what the walk found."""


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

_ADAPTERS: dict[str, tuple[Adapter, ...]] = {
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

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)

# model types refused outright, with the reason (the generic walk would quantize them wrongly or partly)
_MOE = ("mixture-of-experts: the experts are 3-D parameters, not linear layers, and need per-expert calibration "
        "on the tokens routed to each")
_REFUSED: dict[str, str] = {
    **{t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "dbrx", "deepseek_v2",
                         "deepseek_v3", "granitemoe", "granitemoeshared", "jamba", "gpt_oss", "llama4",
                         "llama4_text", "minimax", "ernie4_5_moe")},
    "gemma3": "a multimodal model (Gemma3ForConditionalGeneration); load its text model with Gemma3ForCausalLM "
              "(model type gemma3_text)",
}


def _supported_list() -> str:
    return f"supported families: {', '.join(SUPPORTED_FAMILIES)}"


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture: its row of the table, else the generic walk's (cached on the
    model); a clear error for a model neither can take."""
    model_type = _model_type(model)
    rows = _ADAPTERS.get(model_type)
    if rows is None:
        if model_type in _REFUSED:
            raise UnsupportedArchitectureError(
                f"architecture {model_type!r} ({type(model).__name__}) is not supported: {_REFUSED[model_type]}; "
                f"{_supported_list()}")
        cached = getattr(model, _GENERIC_ATTR, None)
        if isinstance(cached, Adapter):
            return cached
        found = generic_adapter(model)
        object.__setattr__(model, _GENERIC_ATTR, found)  # plain attribute: not a submodule, copied by deepcopy
        return found
    for row in rows:
        if row.matches(model.config):
            return row
    layouts = "; ".join(row.describe_when() for row in rows)
    attrs = sorted({a for row in rows for a, _ in row.when})
    got = ", ".join(f"{a}={getattr(model.config, a, None)!r}" for a in attrs)
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} with {got} matches none of its known layouts ({layouts}); add a row for it to "
        "_ADAPTERS in quantpredict/arch.py")


def family(model: nn.Module) -> str:
    return adapter(model).family


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in execution order."""
    return list(_get(model, adapter(model).blocks))


def hidden_size(model: nn.Module) -> int:
    return int(getattr(model.config, adapter(model).hidden_size_attr))


@dataclass
class LinearRef:
    """A linear layer seen as ``y = x @ W.T + b`` with ``W`` of shape ``[out, in]``, whatever its storage."""

    name: str  # full module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module
    block_index: int

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the parameter, so in-place edits reach the model)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.weight

    def set_weight(self, w: torch.Tensor) -> None:
        """Overwrite the weight with ``w`` of shape ``[out, in]``."""
        target = self.module.weight
        expected = (target.shape[1], target.shape[0]) if self.transposed else tuple(target.shape)
        if tuple(w.shape) != expected:
            raise ValueError(f"{self.name}: weight of shape {tuple(w.shape)} given, expected [out, in] = {expected}")
        with torch.no_grad():
            target.copy_(w.t() if self.transposed else w)


def block_linears(model: nn.Module, index: int) -> list[LinearRef]:
    """Linear layers of block ``index``, in execution order."""
    ad = adapter(model)
    block = blocks(model)[index]
    return [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in ad.linears]


def linear_layers(model: nn.Module) -> list[LinearRef]:
    """Every quantizable linear layer of every block (embeddings and head excluded), in execution order."""
    return [ref for i in range(len(blocks(model))) for ref in block_linears(model, i)]


@dataclass(frozen=True)
class SmoothPair:
    """A norm whose output feeds ``linears`` only: SmoothQuant folds ``1/s`` into the norm and ``s`` into them.

    The norm computes ``x_hat * (norm_offset + weight) (+ bias)`` per channel, so dividing its output by ``s``
    turns ``weight`` into ``(norm_offset + weight) / s - norm_offset`` (and ``bias`` into ``bias / s``).
    """

    norm: nn.Module
    norm_name: str
    linears: list[LinearRef]
    norm_offset: float = 0.0


def smoothquant_supported(model: nn.Module) -> bool:
    return adapter(model).smoothquant


def require_scale_folds(model: nn.Module, method: str = "SmoothQuant", option: str = "smoothquant_alpha") -> None:
    """Raise :class:`UnsupportedArchitectureError` naming the model type when no norm -> linear fold can be exact for
    it (``method`` names the scaling that needs one, ``option`` the recipe field to drop)."""
    ad = adapter(model)
    if not ad.smoothquant:
        raise UnsupportedArchitectureError(
            f"{method} is not supported for model type {_model_type(model)!r}: {ad.smoothquant_unsupported}; "
            f"quantize it without {option}")


def require_smoothquant(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` naming the model type when SmoothQuant cannot be exact for it."""
    require_scale_folds(model)


def smooth_pairs(model: nn.Module, index: int) -> list[SmoothPair]:
    """The norm -> linears pairs of block ``index``; raises where SmoothQuant is unsupported (never an empty list)."""
    require_smoothquant(model)
    ad = adapter(model)
    block = blocks(model)[index]
    pairs = []
    for norm_path, lin_paths in ad.smooth_pairs:
        refs = [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in lin_paths]
        pairs.append(SmoothPair(_get(block, norm_path), f"{ad.blocks}.{index}.{norm_path}", refs, ad.norm_offset))
    return pairs


@dataclass(frozen=True)
class ScaleGroup:
    """One place AWQ scales: ``linears`` read the same input, their input columns are multiplied by ``s`` and ``1/s``
    is folded into what produces that input: a norm (``pair``, as SmoothQuant folds) or the last
    ``linears[0].in_features`` output rows of a previous linear (``prev``, a :class:`LinearFold`)."""

    name: str  # "<prev module>-><linear>+<linear>", stable across copies of the model
    linears: list[LinearRef]
    pair: SmoothPair | None = None
    prev: LinearRef | None = None

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features


def _fold_applies(model: nn.Module, fold: LinearFold, prev: LinearRef, nexts: list[LinearRef]) -> bool:
    if not all(getattr(model.config, attr, None) in values for attr, values in fold.when):
        return False
    return all(prev.out_features == fold.parts * n.in_features for n in nexts)


def awq_groups(model: nn.Module, index: int) -> list[ScaleGroup]:
    """AWQ's scaling groups of block ``index``: every norm -> linears pair (as SmoothQuant folds them), then every
    :class:`LinearFold` of the adapter whose exactness conditions hold (``v -> o`` without grouped-query attention,
    ``up -> down``, OPT's ``fc1 -> fc2`` through ReLU). Raises :class:`UnsupportedArchitectureError` where no norm
    fold is exact (post-norm blocks, the generic walk), as SmoothQuant does."""
    require_scale_folds(model, "AWQ", "awq")
    ad = adapter(model)
    block = blocks(model)[index]
    prefix = f"{ad.blocks}.{index}."
    groups = [ScaleGroup(f"{pair.norm_name}->{'+'.join(r.name.removeprefix(prefix) for r in pair.linears)}",
                         pair.linears, pair=pair) for pair in smooth_pairs(model, index)]
    for fold in ad.linear_folds:
        prev = LinearRef(prefix + fold.prev, _get(block, fold.prev), index)
        nexts = [LinearRef(prefix + p, _get(block, p), index) for p in fold.nexts]
        if _fold_applies(model, fold, prev, nexts):
            groups.append(ScaleGroup(f"{prev.name}->{'+'.join(fold.nexts)}", nexts, prev=prev))
    return groups


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    return [_get(model, p) for p in adapter(model).embeddings]


def head(model: nn.Module) -> nn.Module:
    return _get(model, adapter(model).head)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the head (``nn.Identity`` for a generically walked model where none was found)."""
    path = adapter(model).final_norm
    return _get(model, path) if path else nn.Identity()


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[n, seq_len, vocab]`` from the last block's output ``hidden`` ``[n, seq_len, hidden]``:
    final norm, head, and the soft-capping some models apply after it (Gemma-2/3)."""
    out = head(model)(final_norm(model)(hidden))
    attr = adapter(model).logit_softcap
    cap = getattr(model.config, attr, None) if attr else None
    if cap is not None:
        out = torch.tanh(out / cap) * cap
    return out


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token/position embeddings and the (possibly tied) head, as in Kaplan et al."""
    skip = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    skip |= {id(p) for p in head(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`ModelError` naming the first parameter holding NaN or Inf."""
    for name, p in model.named_parameters():
        bad = (~torch.isfinite(p.detach())).sum().item()
        if bad:
            raise ModelError(
                f"parameter {name!r} holds {bad} NaN/Inf value(s) of {p.numel()}; the model's weights are corrupt "
                "(re-load or re-train it) and cannot be quantized or measured"
            )


def architecture_table() -> list[dict[str, Any]]:
    """One row per adapter (model type and config layout), for ``quantpredict zoo list --architectures``."""
    rows = []
    for model_type, variants in _ADAPTERS.items():
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


# ---- the generic walk ----------------------------------------------------------------------------------------------

_GENERIC_ATTR = "_quantpredict_generic_adapter"
_DUMMY_TOKENS = 8


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_block_list(model: nn.Module) -> str | None:
    """Path of the decoder blocks: the longest ``nn.ModuleList`` of blocks of one class that hold linear layers,
    not nested in another such list (the first in module order on a tie); ``None`` when there is none."""
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(b) for b in mod}) != 1:
            continue
        if _is_linear(mod[0]) or not all(any(_is_linear(m) for m in b.modules()) for b in mod):
            continue
        if any(_inside(name, outer) for outer, _ in found):
            continue
        found.append((name, len(mod)))
    return max(found, key=lambda f: f[1])[0] if found else None


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target and n), None)


def _norm_like(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _dummy_forward(model: nn.Module, blocks_path: str, block0: nn.Module,
                   names: list[str]) -> tuple[list[str], list[str]] | None:
    """Hooks on a dummy forward of ``_DUMMY_TOKENS`` tokens: block 0's linears in the order they first ran, and the
    modules outside the blocks that started after the last block ended (in order); ``None`` if it fails."""
    order: list[str] = []
    after: list[str] = []
    ended: list[bool] = []
    handles = []

    def on_linear(name: str):
        return lambda _m, _a: None if name in order else order.append(name)

    def on_outer(name: str):
        return lambda _m, _a: after.append(name) if ended else None

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # no dropout; the per-module modes are put back below
        for name in names:
            handles.append(_get(block0, name).register_forward_pre_hook(on_linear(name)))
        for name, mod in model.named_modules():
            if name and not _inside(name, blocks_path):
                handles.append(mod.register_forward_pre_hook(on_outer(name)))
        handles.append(_get(model, blocks_path)[-1].register_forward_hook(lambda *_: ended.append(True)))
        param = next(model.parameters())
        vocab = int(getattr(model.config, "vocab_size", _DUMMY_TOKENS + 1) or _DUMMY_TOKENS + 1)
        ids = (torch.arange(1, _DUMMY_TOKENS + 1, device=param.device) % vocab).unsqueeze(0)
        with torch.no_grad():
            model(ids)
    except Exception:  # noqa: BLE001 - any failure of an unknown model's forward means: use module order
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return order, after


def generic_adapter(model: nn.Module, *, warn: bool = True) -> Adapter:
    """An :class:`Adapter` found by walking ``model`` (see the module docstring); emits one
    :class:`GenericArchitectureWarning` naming the model type and what was found unless ``warn`` is false.

    Linears are block 0's ``nn.Linear``/``Conv1D`` modules in the order a dummy forward runs them (linears that never
    run are left out); when that forward fails, in module order. The final norm is the last norm-like module that
    runs between the last block and the head (module order: the last norm-like module outside the blocks). No
    SmoothQuant pairs are known.
    """
    model_type = _model_type(model)
    where = f"architecture {model_type!r} ({type(model).__name__})"
    if getattr(getattr(model, "config", None), "text_config", None) is not None:
        raise UnsupportedArchitectureError(
            f"{where} is a composite (multimodal) model; load its text model as a causal LM; {_supported_list()}")
    path = find_block_list(model)
    if path is None:
        raise UnsupportedArchitectureError(
            f"{where} is not supported: it has no adapter, and the generic walk found no list of decoder blocks "
            f"(an nn.ModuleList of identical blocks holding nn.Linear/Conv1D layers); {_supported_list()}. Add an "
            "adapter in quantpredict/arch.py to support it.")
    block_list = _get(model, path)
    block0 = block_list[0]
    three_d = [n for n, p in block0.named_parameters() if p.dim() >= 3]
    if three_d:
        raise UnsupportedArchitectureError(
            f"{where} is not supported: its blocks hold 3-D weights ({', '.join(three_d[:3])}), as "
            f"mixture-of-experts models do, which are not linear layers; {_supported_list()}")
    names = [n for n, m in block0.named_modules() if n and _is_linear(m)]
    for i, block in enumerate(block_list):
        other = [n for n, m in block.named_modules() if n and _is_linear(m)]
        if other != names:
            raise UnsupportedArchitectureError(
                f"{where} is not supported: block {i} of {path!r} has other linear layers than block 0; "
                f"{_supported_list()}")

    head_name = _module_name(model, model.get_output_embeddings() if hasattr(model, "get_output_embeddings")
                             else None)
    if head_name is None:
        raise UnsupportedArchitectureError(f"{where} is not supported: no output embedding (LM head) was found; "
                                           f"{_supported_list()}")
    outside = [(n, m) for n, m in model.named_modules() if n and not _inside(n, path)]
    embeddings = tuple(n for n, m in outside if isinstance(m, nn.Embedding) and n != head_name)

    ran = _dummy_forward(model, path, block0, names)
    if ran is None:
        linears, source = tuple(names), "module order (the dummy forward failed)"
        norms = [n for n, m in outside if _norm_like(m)]
    else:
        order, after = ran
        linears, source = tuple(order), "forward order"
        before_head = after[: after.index(head_name)] if head_name in after else after
        modules = dict(outside)
        norms = [n for n in before_head if _norm_like(modules[n])]
    if not linears:
        raise UnsupportedArchitectureError(f"{where} is not supported: no linear layer of its blocks ran; "
                                           f"{_supported_list()}")
    final = norms[-1] if norms else ""
    hidden_attr = next((a for a in ("hidden_size", "n_embd", "d_model") if hasattr(model.config, a)), "hidden_size")
    unused = [n for n in names if n not in linears]
    reason = (f"model type {model_type!r} has no adapter and was walked generically, so no norm -> linear pairs are "
              "known; add an adapter for it in quantpredict/arch.py")
    found = Adapter(family=str(model_type), blocks=path, embeddings=embeddings, head=head_name, final_norm=final,
                    linears=linears, smooth_pairs=(), hidden_size_attr=hidden_attr, smoothquant_unsupported=reason,
                    notes=f"generic walk, linears in {source}", generic=True)
    if warn:
        warnings.warn(GenericArchitectureWarning(
            f"model type {model_type!r} has no adapter in quantpredict/arch.py; walked generically: blocks "
            f"{path!r} ({len(block_list)} x {type(block0).__name__}), {len(linears)} linears per block in {source} "
            f"({', '.join(linears)})" + (f", {len(unused)} never ran and are left out ({', '.join(unused)})"
                                         if unused else "")
            + f", embeddings {list(embeddings)}, head {head_name!r}, final norm {final or 'none (identity)'!r}. "
            "SmoothQuant is unavailable for it; check this walk, or add an adapter."), stacklevel=3)
    return found


# ---- block-by-block execution --------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


_CACHE_ARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@dataclass(frozen=True)
class PerBlock:
    """A block keyword argument whose value is not the same for every block: Qwen-2 and Gemma-2/3 pass each
    layer the attention mask of its type (sliding window or full), Gemma-3 also its rotary embeddings (local or
    global). ``values[i]`` is what ``blocks[i]`` receives."""

    blocks: tuple[nn.Module, ...]
    values: tuple[Any, ...]

    def for_block(self, block: nn.Module) -> Any:
        for b, v in zip(self.blocks, self.values):
            if b is block:
                return v
        raise ModelError(f"block {type(block).__name__} is not one of the blocks these inputs were captured on; "
                         "capture_block_inputs on the model whose blocks you run")


@dataclass
class BlockInputs:
    """What block 0 receives for a batch of windows: the hidden states and the keyword arguments (masks, positions,
    rotary embeddings) of every block; one that differs between blocks is a :class:`PerBlock`."""

    hidden: torch.Tensor  # [n, seq_len, hidden]
    kwargs: dict[str, Any]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are different
        return False


def _merge_block_kwargs(block_list: list[nn.Module], per_block: list[dict[str, Any]]) -> dict[str, Any]:
    """Block 0's kwargs, with a :class:`PerBlock` for every key whose value differs in some block."""
    first = per_block[0]
    out = dict(first)
    for key, value in first.items():
        values = tuple(kw.get(key) for kw in per_block)
        if not all(_same(value, v) for v in values[1:]):
            out[key] = PerBlock(tuple(block_list), values)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run the embeddings on ``input_ids`` ([n, seq_len]) and capture block 0's inputs.

    The keyword arguments (attention mask, position ids and embeddings) depend on the sequence length and batch
    size only, so they are captured once for ``batch_size`` windows and reused for every batch of the same size.
    The first batch runs through every block but the last, so that kwargs differing between blocks are seen; the
    other batches stop at block 0.
    """
    block_list = blocks(model)
    captured: list[torch.Tensor] = []
    per_block: list[dict[str, Any]] = []

    def make_hook(index: int, signature: inspect.Signature):
        first_name = next(iter(signature.parameters))

        def hook(_module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            bound.update(bound.pop("kwargs", {}))  # a trailing **kwargs binds as one dict
            hidden = bound.pop(first_name)
            if index == 0:
                captured.append(hidden.detach())
            if len(per_block) == index:  # the first batch: every block's kwargs
                kw = {k: v for k, v in bound.items() if k not in _CACHE_ARGS}
                kw["use_cache"] = False
                per_block.append(kw)
            if len(per_block) == len(block_list):
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i, inspect.signature(b.forward)), with_kwargs=True)
               for i, b in enumerate(block_list)]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(per_block) != len(block_list):
        raise ModelError(f"only {len(per_block)} of the {len(block_list)} blocks ran in the model's forward; "
                         "block-by-block execution needs every block to run")
    return BlockInputs(torch.cat(captured), _merge_block_kwargs(block_list, per_block))


def _slice_rows(v: Any, n: int, captured: int) -> Any:
    """``v`` cut from ``captured`` windows to ``n``: batch-major tensors with ``m`` rows per window (ALiBi's
    ``[batch * heads, ...]``) keep ``m * n`` rows; others with more than ``n`` rows keep ``n``."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] <= n:
        return v
    rows = v.shape[0]
    if rows > captured and rows % captured == 0:
        return v[: rows // captured * n]
    return v[:n]


def _batch_kwargs(kwargs: dict[str, Any], n: int, captured: int) -> dict[str, Any]:
    """Slice batch-shaped tensors in ``kwargs`` (captured for ``captured`` rows) to ``n`` rows."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(_slice_rows(t, n, captured) for t in v)
        else:
            out[k] = _slice_rows(v, n, captured)
    return out


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8) -> torch.Tensor:
    """Apply ``block`` to ``inputs.hidden`` ([n, seq_len, hidden]) in batches; returns the output hidden states.

    ``batch_size`` must be the one the inputs were captured with (their kwargs are shaped for it)."""
    kwargs = {k: v.for_block(block) if isinstance(v, PerBlock) else v for k, v in inputs.kwargs.items()}
    captured = min(batch_size, inputs.hidden.shape[0])
    outs = []
    for start in range(0, inputs.hidden.shape[0], batch_size):
        h = inputs.hidden[start : start + batch_size]
        out = block(h, **_batch_kwargs(kwargs, h.shape[0], captured))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def iter_block_linears(model: nn.Module) -> Iterator[tuple[int, nn.Module, list[LinearRef]]]:
    """(index, block, its linears) for every block, in order."""
    for i, block in enumerate(blocks(model)):
        yield i, block, block_linears(model, i)


# ---- block-by-block execution in bounded memory (see quantpredict.quantize.offload) --------------------------------


@torch.no_grad()
def capture_block_input_batches(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                                sink: Any) -> dict[str, Any]:
    """Like :func:`capture_block_inputs`, but hands each batch's block-0 hidden states ``[b, seq, hidden]`` to
    ``sink(hidden)`` as soon as it is computed instead of concatenating them, so a caller can keep them on disk.
    Every batch stops at block 0. Returns block 0's keyword arguments (captured for ``batch_size`` windows); the
    kwargs of every block, where they differ, come from :func:`capture_block_kwargs`."""
    first = blocks(model)[0]
    kwargs_holder: dict[str, Any] = {}
    signature = inspect.signature(first.forward)
    first_name = next(iter(signature.parameters))

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))  # a trailing **kwargs binds as one dict
        sink(bound.pop(first_name).detach())
        if not kwargs_holder:
            kwargs_holder.update({k: v for k, v in bound.items() if k not in _CACHE_ARGS})
            kwargs_holder["use_cache"] = False
        raise _Stop

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return kwargs_holder


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments of every block for one batch of windows ``[b, seq_len]`` (one forward through every
    block but the last's own computation): block 0's, with a :class:`PerBlock` for those that differ between
    blocks (Qwen-2 and Gemma-2/3's per-layer masks and rotary embeddings). See :func:`block_kwargs`."""
    device = next(model.parameters()).device
    return capture_block_inputs(model, input_ids.to(device), batch_size=input_ids.shape[0]).kwargs


def block_kwargs(kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The keyword arguments block ``index`` receives (a :class:`PerBlock` resolved by position, so a compute copy
    of the block gets its original's)."""
    return {k: v.values[index] if isinstance(v, PerBlock) else v for k, v in kwargs.items()}


def batch_kwargs(kwargs: dict[str, Any], n: int, captured: int) -> dict[str, Any]:
    """The block keyword arguments ``kwargs`` (captured for ``captured`` windows) sliced to a batch of ``n``."""
    return _batch_kwargs(kwargs, n, captured)


@contextlib.contextmanager
def input_hooks(refs: Sequence[LinearRef], on_input: Callable[[LinearRef, torch.Tensor], None]) -> Iterator[None]:
    """Inside the ``with``, every forward pass calls ``on_input(ref, x)`` with the input ``x`` ``[..., in]`` of each
    linear ``ref``, as the module receives it: the hooks are prepended, so they see the input before any activation
    fake-quant pre-hook changes it. The hooks are removed on exit, also after an error."""
    handles = []
    for ref in refs:
        def hook(_module, args, _ref=ref):
            on_input(_ref, args[0])

        handles.append(ref.module.register_forward_pre_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def linears_of(model: nn.Module, index: int, block: nn.Module) -> list[LinearRef]:
    """The linears of ``block`` (block ``index`` of ``model``, or a copy of it), named as in the model."""
    ad = adapter(model)
    return [LinearRef(f"{ad.blocks}.{index}.{p}", _get(block, p), index) for p in ad.linears]
