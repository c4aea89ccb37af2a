"""llama.cpp's named k-quant mixes (``Q4_K_M`` and friends) as per-layer recipes of a given model.

``llama-quantize`` picks each tensor's type from the file type, the tensor's role and its layer
(``llama_tensor_get_type_impl`` in llama.cpp's src/llama-quant.cpp, read at commit 007dbbf; dense models, no
importance matrix, not a 70B GQA-8 model, not MoE). For the linear layers quantpredict quantizes:

* ``q4_k_m``: Q4_K, except ``attn_v`` (and a fused ``attn_qkv``) and ``ffn_down`` of the layers where
  ``use_more_bits(i, n)`` holds, which get Q6_K; ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``
  (integer division). Falcon's ``ffn_down``: Q6_K for ``i < n/16``, Q5_K where ``use_more_bits``, else Q4_K.
* ``q5_k_m``: Q5_K, with Q6_K for ``attn_v``/``attn_qkv`` and ``ffn_down`` where ``use_more_bits``.
* ``q4_k_s``: Q4_K, with Q5_K for ``attn_v``/``attn_qkv`` of the first 4 layers and ``ffn_down`` of the first
  ``n/8`` (not Falcon's).
* ``q5_k_s``: Q5_K everywhere.
* ``q4_k_pure``, ``q5_k_pure``, ``q6_k_pure``: ``llama-quantize --pure`` (one type for every tensor);
  ``q6_k_pure`` is also what llama.cpp's Q6_K file type gives these tensors.

The low-bit mixes (read in the llama.cpp vendored by llama-cpp-python 0.3.36, the same function):

* ``q2_k_mix``: llama.cpp's Q2_K file type (named ``_mix`` because ``q2_k`` is the format, and recipe text
  ``q2_k-rtn`` must keep meaning it): Q2_K, except ``attn_v``/``attn_qkv`` (Q3_K, or Q4_K when ``n_gqa >= 4``:
  attention heads per key/value head, :func:`gqa_ratio`), ``ffn_down`` (Q3_K) and ``attn_output`` (Q3_K; not
  Falcon's).
* ``q3_k_s``: Q3_K everywhere.
* ``q3_k_m``: Q3_K, except ``attn_v``/``attn_qkv`` (Q5_K in layers 0-1, else Q4_K), ``ffn_down`` (Q5_K for
  ``i < n/16``, else Q4_K; Falcon's: Q4_K where ``use_more_bits``, else Q3_K) and ``attn_output`` (Q4_K; not
  Falcon's).
* ``q3_k_l``: Q3_K, except ``attn_v``/``attn_qkv`` (Q5_K), ``ffn_down`` and ``attn_output`` (Q5_K; Falcon's Q4_K).
* ``iq4_xs_mix``: llama.cpp's IQ4_XS file type (``iq4_xs`` is the format): IQ4_XS, except ``ffn_down`` of the
  first ``n/8`` layers (Q5_K, llama.cpp's rule without an importance matrix) and ``attn_v``/``attn_qkv`` when
  ``n_gqa >= 4`` (Q5_K).

Then llama.cpp's fallback for a tensor whose rows (``in_features``) are not a multiple of the 256-element
super-block: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K and Q2_K -> Q4_0, IQ4_XS -> IQ4_NL, and F16
(``fp16`` here) when the rows are not even a multiple of 32 (``tensor_type_fallback``). Tensor roles come from the
layer's place in its block (``q_proj`` -> ``attn_q``, fused ``c_attn``/``qkv_proj``/``query_key_value`` ->
``attn_qkv``, ``fc1``/``c_fc``/``dense_h_to_4h`` -> ``ffn_up``, ``fc2``/``mlp.c_proj``/``dense_4h_to_h`` ->
``ffn_down``, ...); since llama.cpp's tensor categories were unified a fused ``attn_qkv`` takes the ``attn_v`` rule
(older llama.cpp gave it Q5_K in Q4_K_M). OPT has no llama.cpp architecture; its layers are mapped by the same roles.

The token embedding and the output head: a mix names the linear layers only (both stay in 16 bits, counted so in
every size), unless it carries the option ``file``: ``q4_k_m-file`` is llama-quantize's whole file, the embedding and
head too (:func:`file_roles`, the recipe's ``embedding_format`` / ``head_format``). The output head (or a tied
embedding, which llama.cpp then reads as the head) gets Q6_K, or Q8_0 for Falcon, for rows the file type's block
does not tile, or when the type is Q8_0; an untied token embedding the file type's own type (then the shape
fallback); ``--pure`` mixes give both the one type. The predictors do not price these two matrices yet and refuse
a ``-file`` recipe; it is measured and exported.

A mix is named in recipe text as ``NAME[-OPTIONS]``: ``q4_k_m`` (RTN, as llama.cpp without an importance matrix),
``q4_k_m-gptq``, ``q4_k_m-gptq-awq``, ``q4_k_m-file``; the options are any label segments but per-layer ones, and
``file``. :func:`named_mix` resolves it for a model into an explicit per-layer recipe (``L=...``, and ``E=``/``H=``
with ``file``), whose label keys its runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quantpredict.errors import RecipeError
from quantpredict.formats.table import GGML_FALLBACK
from quantpredict.recipe import Recipe, mixed_recipe

QK_K = 256
FALLBACK = GGML_FALLBACK  # llama.cpp's tensor_type_fallback: q4_k -> q5_0, q3_k -> q4_0, iq4_xs -> iq4_nl, ...
FP16 = "fp16"  # llama.cpp's F16, when even the fallback's block of 32 does not tile a row

# ---- tensor roles ---------------------------------------------------------------------------------------------------

ATTN_V_LIKE = ("attn_v", "attn_qkv")  # llama.cpp's category_is_attn_v
_ROLE_OF_LAST = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
    "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "Wqkv": "attn_qkv",
    "o_proj": "attn_output", "out_proj": "attn_output", "dense": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "gate_up_proj": "ffn_up", "fc1": "ffn_up", "c_fc": "ffn_up",
    "dense_h_to_4h": "ffn_up", "fc_in": "ffn_up",
    "down_proj": "ffn_down", "fc2": "ffn_down", "dense_4h_to_h": "ffn_down", "fc_out": "ffn_down",
}


def tensor_role(path: str) -> str:
    """llama.cpp's tensor category of the linear at ``path`` inside its block (``self_attn.v_proj`` -> ``attn_v``,
    ``mlp.c_proj`` -> ``ffn_down``); ``other`` for a layer no rule of the mixes names."""
    parent, _, last = path.rpartition(".")
    if last == "c_proj":  # GPT-2 names both its attention output and its MLP output c_proj
        return "ffn_down" if "mlp" in parent else "attn_output"
    return _ROLE_OF_LAST.get(last, "other")


@dataclass(frozen=True)
class Slot:
    """What a mix rule sees of one linear layer: its name, role, block index and row length."""

    name: str
    role: str
    layer: int
    in_features: int


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# ---- the mixes ------------------------------------------------------------------------------------------------------

Rule = Callable[[Slot, int, str, int], str]  # (slot, layer count, family, n_gqa) -> the wanted ggml type before the
# fallback; n_gqa is llama.cpp's hparams.n_gqa(): attention heads per key/value head (1 without GQA)


def _q4_k_m(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE and use_more_bits(slot.layer, n):
        return "q6_k"
    if slot.role == "ffn_down":
        if family == "falcon":
            return "q6_k" if slot.layer < n // 16 else ("q5_k" if use_more_bits(slot.layer, n) else "q4_k")
        if use_more_bits(slot.layer, n):
            return "q6_k"
    return "q4_k"


def _q5_k_m(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    more = use_more_bits(slot.layer, n)
    return "q6_k" if more and (slot.role in ATTN_V_LIKE or slot.role == "ffn_down") else "q5_k"


def _q4_k_s(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE and slot.layer < 4:
        return "q5_k"
    if slot.role == "ffn_down" and family != "falcon" and slot.layer < n // 8:
        return "q5_k"
    return "q4_k"


def _q2_k(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE:
        return "q4_k" if n_gqa >= 4 else "q3_k"
    if slot.role == "ffn_down" or (slot.role == "attn_output" and family != "falcon"):
        return "q3_k"
    return "q2_k"


def _q3_k_m(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE:
        return "q5_k" if slot.layer < 2 else "q4_k"
    if slot.role == "ffn_down":
        if slot.layer < n // 16:
            return "q5_k"
        return "q4_k" if family != "falcon" or use_more_bits(slot.layer, n) else "q3_k"
    if slot.role == "attn_output" and family != "falcon":
        return "q4_k"
    return "q3_k"


def _q3_k_l(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE:
        return "q5_k"
    if slot.role in ("ffn_down", "attn_output"):
        return "q4_k" if family == "falcon" else "q5_k"
    return "q3_k"


def _iq4_xs(slot: Slot, n: int, family: str, n_gqa: int) -> str:
    if slot.role in ATTN_V_LIKE and n_gqa >= 4:
        return "q5_k"
    if slot.role == "ffn_down" and slot.layer < n // 8:  # llama.cpp: without an importance matrix only
        return "q5_k"
    return "iq4_xs"


def _pure(fmt: str) -> Rule:
    return lambda slot, n, family, n_gqa: fmt


@dataclass(frozen=True)
class Mix:
    """A named mix: llama.cpp's file type name, the base type and the rule choosing each layer's type."""

    name: str
    ftype: str
    base: str
    rule: Rule
    summary: str


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("q4_k_s", "Q4_K_S", "q4_k", _q4_k_s, "Q4_K; Q5_K for attn_v of layers 0-3 and ffn_down of the first n/8"),
    Mix("q4_k_m", "Q4_K_M", "q4_k", _q4_k_m, "Q4_K; Q6_K for attn_v and ffn_down where use_more_bits"),
    Mix("q5_k_s", "Q5_K_S", "q5_k", _pure("q5_k"), "Q5_K everywhere"),
    Mix("q5_k_m", "Q5_K_M", "q5_k", _q5_k_m, "Q5_K; Q6_K for attn_v and ffn_down where use_more_bits"),
    Mix("q4_k_pure", "Q4_K --pure", "q4_k", _pure("q4_k"), "Q4_K everywhere"),
    Mix("q5_k_pure", "Q5_K --pure", "q5_k", _pure("q5_k"), "Q5_K everywhere"),
    Mix("q6_k_pure", "Q6_K", "q6_k", _pure("q6_k"), "Q6_K everywhere"),
    Mix("q2_k_mix", "Q2_K", "q2_k", _q2_k, "Q2_K; Q3_K for attn_v (Q4_K with n_gqa >= 4), ffn_down and attn_output"),
    Mix("q3_k_s", "Q3_K_S", "q3_k", _pure("q3_k"), "Q3_K everywhere"),
    Mix("q3_k_m", "Q3_K_M", "q3_k", _q3_k_m,
        "Q3_K; attn_v Q5_K in layers 0-1 else Q4_K; ffn_down Q5_K for the first n/16 else Q4_K; attn_output Q4_K"),
    Mix("q3_k_l", "Q3_K_L", "q3_k", _q3_k_l, "Q3_K; Q5_K for attn_v, ffn_down and attn_output"),
    Mix("iq4_xs_mix", "IQ4_XS", "iq4_xs", _iq4_xs,
        "IQ4_XS; Q5_K for ffn_down of the first n/8 (and attn_v if n_gqa >= 4)"),
)}
MIX_NAMES: tuple[str, ...] = tuple(MIXES)


def get_mix(name: str) -> Mix:
    mix = MIXES.get(str(name).strip().lower())
    if mix is None:
        raise RecipeError(f"unknown named mix {name!r}; named mixes: {', '.join(MIX_NAMES)}")
    return mix


def fallback(fmt: str, in_features: int) -> str:
    """llama.cpp's type for a tensor of rows of ``in_features`` that ``fmt`` wants: ``fmt`` where its super-block
    tiles the row, else Q5_0 / Q5_1 / Q8_0 for Q4_K / Q5_K / Q6_K, Q4_0 for Q3_K / Q2_K, IQ4_NL for IQ4_XS, or fp16
    where not even 32 does."""
    if fmt not in FALLBACK or in_features % QK_K == 0:
        return fmt
    return FALLBACK[fmt] if in_features % 32 == 0 else FP16


def mix_formats(mix: Mix | str, slots: Sequence[Slot], family: str = "", n_gqa: int = 1) -> list[str]:
    """Each slot's format under ``mix`` (rule, then the shape fallback); ``slots`` are every quantized linear of the
    model in ``arch.linear_layers`` order; ``n_gqa``: attention heads per key/value head (:func:`gqa_ratio`)."""
    m = mix if isinstance(mix, Mix) else get_mix(mix)
    n_layers = 1 + max((s.layer for s in slots), default=0)
    return [fallback(m.rule(s, n_layers, family, n_gqa), s.in_features) for s in slots]


def gqa_ratio(model: Any) -> int:
    """llama.cpp's ``n_gqa()``: ``n_head / n_head_kv`` (integer division) from the model's config
    (``num_key_value_heads``; Falcon's ``num_kv_heads``, or 1 for its multi-query models); 1 when the config names
    no key/value heads."""
    cfg = getattr(model, "config", None)
    n_head = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_head:
        return 1
    n_kv = getattr(cfg, "num_key_value_heads", None)
    if n_kv is None and getattr(cfg, "new_decoder_architecture", False):
        n_kv = getattr(cfg, "num_kv_heads", None)
    if n_kv is None and getattr(cfg, "multi_query", False):
        n_kv = 1
    return max(1, int(n_head) // int(n_kv or n_head))


# ---- recipe text ----------------------------------------------------------------------------------------------------


#: the mix option for llama-quantize's whole file: the token embedding and output head too
FILE_OPTION = "file"


def split_mix_spec(spec: str) -> tuple[Mix, Recipe] | None:
    """``(mix, base recipe)`` for recipe text naming a mix (``q4_k_m``, ``q4_k_m-gptq-awq``), ``None`` for any other
    text. The base recipe carries the options (method, AWQ, calibration ...) with the mix's base format; the
    ``file`` option is not a recipe option (see :func:`is_file_spec`)."""
    head, _, rest = str(spec).strip().partition("-")
    if head.lower() not in MIXES:
        return None
    mix = MIXES[head.lower()]
    segments = [p for p in rest.split("-") if p and p != FILE_OPTION] if rest else []
    per_layer = [p for p in segments if p.startswith(("@", "L=", "skip"))]
    if per_layer:
        raise RecipeError(f"{spec!r}: a named mix sets every layer's format itself; drop {', '.join(per_layer)}")
    if segments and segments[0] not in ("rtn", "gptq", "qat", "qat_gptq"):
        segments.insert(0, "rtn")
    base = Recipe.from_label("-".join([mix.base, *(segments or ["rtn"])]))
    return mix, base


def is_file_spec(spec: Any) -> bool:
    """Whether mix text asks for llama-quantize's whole file (the ``file`` option: embedding and head too)."""
    return isinstance(spec, str) and FILE_OPTION in str(spec).strip().split("-")[1:]


def file_roles(mix: Mix | str, model: Any) -> tuple[str | None, str]:
    """``(embedding_format, head_format)`` of llama-quantize's ``mix`` file for ``model``
    (``llama_tensor_get_type_impl``, no importance matrix, no ``--token-embedding-type``/``--output-tensor-type``):
    the head Q6_K, or Q8_0 for Falcon, where the file type's block does not tile the rows, or where the type is
    Q8_0; the embedding the file type's type with the shape fallback. A tied model has no output tensor: llama.cpp
    takes its ``token_embd`` as the head, so the embedding format is ``None`` (the head's applies to the one
    matrix). ``--pure`` mixes: the one type for both (with the fallback)."""
    from quantpredict import arch

    m = mix if isinstance(mix, Mix) else get_mix(mix)
    hidden = int(arch.embedding_modules(model)[0].weight.shape[1])
    tied = arch.head_is_tied(model)
    if m.name.endswith("_pure"):
        fmt = fallback(m.base, hidden)
        return (None if tied else fmt), fmt
    if arch.family(model) == "falcon" or fallback(m.base, hidden) != m.base or m.base == "q8_0":
        out = "q8_0"
    else:
        out = "q6_k"
    return (None if tied else fallback(m.base, hidden)), out


def is_mix_spec(spec: Any) -> bool:
    """Whether ``spec`` is recipe text naming a mix (checked, so a bad option fails here)."""
    return isinstance(spec, str) and split_mix_spec(spec) is not None


def model_slots(model: Any) -> list[Slot]:
    """The :class:`Slot` of every linear of ``model`` (``arch.linear_layers`` order)."""
    from quantpredict import arch

    ad = arch.adapter(model)
    out = []
    for ref in arch.linear_layers(model):
        path = ref.name.removeprefix(f"{ad.blocks}.{ref.block_index}.")
        out.append(Slot(ref.name, tensor_role(path), ref.block_index, ref.in_features))
    return out


def named_mix(name: str, model: Any, base: Recipe | None = None) -> Recipe:
    """The recipe llama.cpp's mix ``name`` (see :data:`MIXES`) gives ``model``'s linear layers: an explicit format
    per layer (``mixed_recipe``), with the options of ``base`` (default: RTN, the mix's base format). ``name`` may
    also carry options, ``q4_k_m-gptq``."""
    from quantpredict import arch

    mix, recipe = mix_base(name, base)
    if is_file_spec(name):
        emb, head = file_roles(mix, model)
        recipe = dataclasses.replace(recipe, embedding_format=emb, head_format=head)
    return slots_mix(mix, recipe, model_slots(model), arch.family(model), gqa_ratio(model))


def mix_base(name: str, base: Recipe | None = None) -> tuple[Mix, Recipe]:
    """``(mix, recipe before the per-layer formats)`` of mix text ``name``: ``base``'s options with the mix's base
    format (default: the options ``name`` carries, RTN without any); a :class:`RecipeError` for unknown text."""
    found = split_mix_spec(name)
    if found is None:
        raise RecipeError(f"unknown named mix {name!r}; named mixes: {', '.join(MIX_NAMES)} (with options: "
                          "q4_k_m-gptq, q4_k_m-gptq-awq, q4_k_m-file)")
    mix, spec_base = found
    return mix, (spec_base if base is None else dataclasses.replace(base, weight_format=mix.base, block_size=None))


def slots_mix(mix: Mix, recipe: Recipe, slots: Sequence[Slot], family: str, n_gqa: int) -> Recipe:
    """``recipe`` with one explicit format per linear layer, as ``mix`` gives them to ``slots`` (every linear of the
    model, :func:`model_slots` order) of a ``family`` model with ``n_gqa`` attention heads per key/value head: what
    :func:`named_mix` returns, from the layers' names and shapes alone (no model object needed)."""
    return mixed_recipe(recipe, [(f, None) for f in mix_formats(mix, slots, family, n_gqa)])


def resolve_recipe(spec: Recipe | str | dict, model: Any) -> Recipe:
    """A :class:`Recipe` for ``model`` from a Recipe, a label, a dict of fields or a named mix (``q4_k_m``)."""
    if isinstance(spec, str) and is_mix_spec(spec):
        return named_mix(spec, model)
    return Recipe.coerce(spec)


def split_specs(specs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """``(recipes or labels, named mix texts)`` of a list of recipe specs."""
    plain = [s for s in specs if not is_mix_spec(s)]
    return plain, [s for s in specs if is_mix_spec(s)]


def mix_of(recipe: Recipe, model: Any) -> str | None:
    """The mix text (``q4_k_m``, ``q4_k_m-gptq``, ``q4_k_m-file``) whose resolution for ``model`` is ``recipe``, if
    any."""
    if not recipe.layer_formats:
        return None
    options = Recipe.from_label(recipe.label.split("-L=")[0]).label.split("-", 1)[1]
    for name, mix in MIXES.items():
        if mix.base != recipe.weight_format:
            continue
        text = name if options == "rtn" else f"{name}-{options}"
        if recipe.embedding_format is not None or recipe.head_format is not None:
            text += f"-{FILE_OPTION}"
        if named_mix(text, model).label == recipe.label:
            return text
    return None
