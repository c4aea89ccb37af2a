"""The contracts every sweep depends on, torch-free: the quantization :class:`Recipe`, the evaluation setting
:class:`EvalSetting`, the method names and the measurement version.

A :class:`Recipe` is a frozen dataclass with a stable, parseable label (``mxfp4_e2m1-gptq-sq0.5-a_mxint8``) that keys
everything stored or cached about a quantized model. Only options that differ from their defaults appear in the
label, so adding an option with a default later keeps every existing label valid. ``Recipe.from_label(r.label) ==
r`` for every recipe (tested over every recipe of the shipped run store).

Label grammar (segments joined by ``-``; format names and layer patterns never contain ``-``)::

    WEIGHT[_bN]-METHOD[-awq][-sqALPHA][-a_ACT[_bN]][-ao][-pdX][-gbN][-calNxL][-seedN][-qsN][-qlrX][-qbsN]
        [-skipNAME+NAME...][-@PATTERN=FORMAT[_bN]]...[-L=FORMAT[_bN][*COUNT],...]

- ``METHOD`` is ``rtn`` or ``gptq``; a QAT recipe writes ``qat`` (QAT from RTN) or ``qat_gptq`` (QAT from GPTQ).
- ``_bN`` is a block size other than the format's default; ``awq`` activation-aware scaling before rounding;
  ``ao`` GPTQ's act_order, ``pd`` its damping, ``gb`` its lazy-batch block size; ``cal`` the number and length of
  calibration windows; ``qs``/``qlr``/``qbs`` QAT's steps, learning rate and batch size.
- ``@PATTERN=FORMAT``: a per-layer override. Layers whose name matches ``PATTERN`` (the full name, a dotted suffix
  such as ``mlp.down_proj``, or an fnmatch pattern such as ``*.0.*``) take that format; the first matching
  override wins, in label order. ``FORMAT`` may be ``skip`` (the layer stays in full precision).
- ``L=...``: an explicit format for every quantized linear layer, in ``arch.linear_layers`` order, run-length
  encoded (``mxint4*3,mxint8,mxint4*6``). It overrides everything else.

The evaluation side of a run key is :class:`EvalSetting` (``seq256-w256``; ``-bos`` when windows start with the
tokenizer's BOS token; ``-txt<sha>`` for a user's own text).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from quantpredict.errors import FormatError, RecipeError
from quantpredict.version import MEASUREMENT_VERSION, __version__  # noqa: F401 (both kept at this path)

# Part of every run key: the measurement version under its historical name (see quantpredict.version).
CODE_VERSION = MEASUREMENT_VERSION

#: Post-training methods (how each weight is rounded). QAT is an option on top of one of them (``Recipe.qat``).
METHODS: tuple[str, ...] = ("rtn", "gptq")
#: The method column of the run store: the label's method segment (QAT runs read ``qat`` / ``qat_gptq``).
METHOD_NAMES: tuple[str, ...] = ("rtn", "gptq", "qat", "qat_gptq")
_QAT_NAME = {"rtn": "qat", "gptq": "qat_gptq"}
_QAT_INIT = {v: k for k, v in _QAT_NAME.items()}

#: The recipe fields that are run-store columns of their own (the rest live in the label and ``recipe_json``).
RECIPE_COLUMNS: tuple[str, ...] = ("weight_format", "block_size", "method", "smoothquant_alpha", "act_format")

SKIP = "skip"  # the per-layer "format" that leaves a layer in full precision

_DEFAULTS = {
    "calib_samples": 128,
    "calib_seq_len": 256,
    "gptq_blocksize": 128,
    "percdamp": 0.01,
    "seed": 0,
    "qat_steps": 200,
    "qat_lr": 1e-3,
    "qat_batch_size": 8,
}
_BAD_NAME_CHARS = set("-+=,@|")


def _num(x: float) -> str:
    """A short, exact text for a float: 0.5 -> '0.5', 1.0 -> '1', 0.01 -> '0.01'."""
    return format(float(x), "g") if float(x) == float(format(float(x), "g")) else repr(float(x))


def _formats():
    # quantpredict.formats resolves its table without torch (its torch functions load on first use)
    from quantpredict.formats import get_format

    return get_format


def resolve_block_size(fmt: str, block_size: int | None) -> int | None:
    """``block_size``, or the format's default (32 for MX; None, i.e. per channel, for INT/FP8; None for floats)."""
    return _formats()(fmt).default_block_size if block_size is None else block_size


def _canonical_block(fmt: str, block_size: int | None) -> int | None:
    """``None`` when ``block_size`` is the format's default: one recipe, one label, one equality."""
    if block_size is not None and block_size == _formats()(fmt).default_block_size:
        return None
    return block_size


def _check_block(what: str, v: Any) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise FormatError(f"{what} must be a positive integer (or unset: the format's default), got {v!r}")


def _with_block(fmt: str, block_size: int | None) -> str:
    block_size = _canonical_block(fmt, block_size) if fmt != SKIP else None
    return fmt if block_size is None else f"{fmt}_b{block_size}"


def _split_block(text: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+?)_b(\d+)", text)
    return (m.group(1), int(m.group(2))) if m else (text, None)


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name or _BAD_NAME_CHARS & set(name):
        raise RecipeError(f"{what} {name!r} must be a non-empty layer name or pattern without any of "
                          f"{' '.join(sorted(_BAD_NAME_CHARS))}")


def layer_matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, ends with ``.pattern``, or matches it as an fnmatch pattern (``*.0.*``)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: layers matching ``pattern`` take ``weight_format`` (``"skip"``: not quantized)."""

    pattern: str
    weight_format: str
    block_size: int | None = None

    def __post_init__(self) -> None:
        _check_name("layer pattern", self.pattern)
        if self.weight_format != SKIP:
            _formats()(self.weight_format)
        _check_block(f"block_size of the override for {self.pattern!r}", self.block_size)
        if self.weight_format == SKIP and self.block_size is not None:
            raise RecipeError(f"the override {self.pattern!r}=skip cannot have a block size")
        if self.weight_format != SKIP:
            object.__setattr__(self, "block_size", _canonical_block(self.weight_format, self.block_size))

    @property
    def label(self) -> str:
        return f"@{self.pattern}={_with_block(self.weight_format, self.block_size)}"

    @classmethod
    def parse(cls, text: str) -> LayerRule:
        """``PATTERN=FORMAT[_bN]`` (the label segment without its ``@``)."""
        pattern, sep, fmt = text.partition("=")
        if not sep:
            raise RecipeError(f"layer override {text!r} must read PATTERN=FORMAT, e.g. 'mlp.down_proj=mxint8'")
        fmt, block = _split_block(fmt)
        return cls(pattern, fmt, block)


def _encode_layer_list(entries: Sequence[tuple[str, int | None]]) -> str:
    """Run-length text of per-layer formats: ``mxint4*3,mxint8``."""
    out: list[str] = []
    i = 0
    while i < len(entries):
        j = i
        while j + 1 < len(entries) and entries[j + 1] == entries[i]:
            j += 1
        text = _with_block(*entries[i])
        out.append(text if j == i else f"{text}*{j - i + 1}")
        i = j + 1
    return ",".join(out)


def _decode_layer_list(text: str) -> tuple[tuple[str, int | None], ...]:
    out: list[tuple[str, int | None]] = []
    for item in text.split(","):
        body, star, count = item.partition("*")
        if not body or (star and not count.isdigit()) or (star and int(count) < 1):
            raise RecipeError(f"per-layer list entry {item!r} must read FORMAT[_bN][*COUNT], e.g. 'mxint4*3'")
        out.extend([_split_block(body)] * (int(count) if star else 1))
    return tuple(out)


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Attributes:
        weight_format: a :mod:`quantpredict.formats` name (``mxint4``, ``mxfp4_e2m1``, ``int4``, ``bf16`` ...);
            with per-layer formats, the format of every layer no override names.
        block_size: elements per shared scale along a weight's input dimension; ``None`` takes the format's
            default (32 for MX formats, one scale per output row for INT/FP8).
        method: ``"rtn"`` (round to nearest) or ``"gptq"`` (Frantar et al. 2023).
        smoothquant_alpha: migration strength of SmoothQuant (Xiao et al. 2023) in [0, 1], or ``None`` for none.
        act_format: format for the inputs of every quantized linear at run time, or ``None`` (not quantized).
        act_block_size: block size of the activation format along the hidden dimension (``None``: its default,
            32 for MX, one scale per token for INT/FP8).
        calib_samples, calib_seq_len: calibration windows cut from 1-D calibration ids.
        gptq_blocksize, percdamp, act_order: GPTQ's lazy-batch block, damping (fraction of mean diag H) and
            column ordering by descending Hessian diagonal.
        skip: linear layers left unquantized: full names or suffixes (``"mlp.down_proj"``) or fnmatch patterns
            (``"*.0.*"``). Embeddings and the LM head are never quantized (they are not in ``arch.linear_layers``).
        seed: seed of the calibration window offsets.
        awq: activation-aware weight scaling (Lin et al. 2024) before rounding, composable with RTN and GPTQ.
        qat: quantization-aware fine-tuning after the PTQ ``method`` (QAT from RTN or from GPTQ), with
            ``qat_steps`` AdamW steps at ``qat_lr`` on batches of ``qat_batch_size`` calibration windows.
        layers: per-layer overrides (:class:`LayerRule`), the first match winning.
        layer_formats: an explicit ``(format, block_size)`` for every quantized linear layer in
            ``arch.linear_layers`` order (``("skip", None)`` leaves a layer in full precision); overrides
            ``weight_format``, ``layers`` and ``skip``. Its length is checked against the model when it is used.
        embedding_format, head_format: the token embedding's and the LM head's format (RTN, the format's default
            block along the hidden dimension), as llama.cpp's files quantize them (``token_embd.weight``,
            ``output.weight``); ``None`` (the default) leaves them as they are. A model with tied embeddings has
            one matrix: give the same format for both, or one of them (llama.cpp then stores ``token_embd`` in
            the output's type). Measured (``quantize_model``, ``compare``) and exported; the weights-only pricing
            does not cover them yet and refuses such a recipe.
    """

    weight_format: str
    block_size: int | None = None
    method: str = "rtn"
    smoothquant_alpha: float | None = None
    act_format: str | None = None
    act_block_size: int | None = None
    calib_samples: int = 128
    calib_seq_len: int = 256
    gptq_blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    skip: tuple[str, ...] = ()
    seed: int = 0
    awq: bool = False
    qat: bool = False
    qat_steps: int = 200
    qat_lr: float = 1e-3
    qat_batch_size: int = 8
    layers: tuple[LayerRule, ...] = ()
    layer_formats: tuple[tuple[str, int | None], ...] = ()
    embedding_format: str | None = None
    head_format: str | None = None

    def __post_init__(self) -> None:
        # normalise types first (JSON gives lists and dicts, argparse may give ints for floats)
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "layers", tuple(_as_rule(r) for r in self.layers))
        object.__setattr__(self, "layer_formats", tuple(_as_entry(e) for e in self.layer_formats))
        for name in ("smoothquant_alpha",):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _float(name, getattr(self, name)))
        object.__setattr__(self, "percdamp", _float("percdamp", self.percdamp))
        object.__setattr__(self, "qat_lr", _float("qat_lr", self.qat_lr))
        self._validate()
        object.__setattr__(self, "block_size", _canonical_block(self.weight_format, self.block_size))
        object.__setattr__(self, "layer_formats", tuple(
            (f, None if f == SKIP else _canonical_block(f, b)) for f, b in self.layer_formats))
        if self.act_format is not None:
            object.__setattr__(self, "act_block_size", _canonical_block(self.act_format, self.act_block_size))

    def _validate(self) -> None:
        get_format = _formats()
        if not isinstance(self.weight_format, str):
            raise RecipeError(f"weight_format must be a format name, got {self.weight_format!r}")
        get_format(self.weight_format)  # raises FormatError listing the valid names
        if self.act_format is not None:
            get_format(self.act_format)
        for name in ("embedding_format", "head_format"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, str) or v == SKIP:
                    raise RecipeError(f"{name} must be a format name (or unset: kept as it is), got {v!r}")
                get_format(v)
        if self.method not in METHODS:
            hint = " (QAT is the option qat=True on top of rtn or gptq)" if self.method in _QAT_INIT else ""
            raise RecipeError(f"unknown quantization method {self.method!r}; valid methods: {', '.join(METHODS)}"
                              f"{hint}")
        _check_block("block_size", self.block_size)
        _check_block("act_block_size", self.act_block_size)
        if self.act_block_size is not None and self.act_format is None:
            raise RecipeError("act_block_size is set but act_format is None; give an act_format or drop "
                              "act_block_size")
        a = self.smoothquant_alpha
        if a is not None and not 0.0 <= a <= 1.0:
            raise RecipeError(f"smoothquant_alpha must lie in [0, 1] (0.5 is the usual choice), got {a}")
        for name in ("calib_samples", "gptq_blocksize", "qat_steps", "qat_batch_size", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                raise RecipeError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                                  f"got {v!r}")
        if not isinstance(self.calib_seq_len, int) or self.calib_seq_len < 2:
            raise RecipeError(f"calib_seq_len must be an integer >= 2, got {self.calib_seq_len!r}")
        if not self.percdamp >= 0.0:
            raise RecipeError(f"percdamp must be >= 0 (0.01 is the usual choice), got {self.percdamp}")
        if not self.qat_lr > 0.0:
            raise RecipeError(f"qat_lr must be > 0 (1e-3 by default, 1e-4 the stronger baseline), got {self.qat_lr}")
        for s in self.skip:
            _check_name("skip entry", s)
        for fmt, bs in self.layer_formats:
            if fmt != SKIP:
                get_format(fmt)
            _check_block(f"block size of per-layer format {fmt!r}", bs)

    # ---- labels ------------------------------------------------------------------------------------------------

    @property
    def method_name(self) -> str:
        """The label's method segment and the run store's ``method`` column: ``rtn``, ``gptq``, ``qat`` (QAT from
        RTN) or ``qat_gptq`` (QAT from GPTQ)."""
        return _QAT_NAME[self.method] if self.qat else self.method

    @property
    def label(self) -> str:
        """Short stable name, e.g. ``mxfp4_e2m1-gptq-sq0.5-a_mxint8`` or ``mxint4_b128-rtn``."""
        parts = [_with_block(self.weight_format, self.block_size), self.method_name]
        if self.awq:
            parts.append("awq")
        if self.smoothquant_alpha is not None:
            parts.append(f"sq{_num(self.smoothquant_alpha)}")
        if self.act_format is not None:
            parts.append("a_" + _with_block(self.act_format, self.act_block_size))
        if self.act_order:
            parts.append("ao")
        if self.percdamp != _DEFAULTS["percdamp"]:
            parts.append(f"pd{_num(self.percdamp)}")
        if self.gptq_blocksize != _DEFAULTS["gptq_blocksize"]:
            parts.append(f"gb{self.gptq_blocksize}")
        if (self.calib_samples, self.calib_seq_len) != (_DEFAULTS["calib_samples"], _DEFAULTS["calib_seq_len"]):
            parts.append(f"cal{self.calib_samples}x{self.calib_seq_len}")
        if self.seed != _DEFAULTS["seed"]:
            parts.append(f"seed{self.seed}")
        if self.qat_steps != _DEFAULTS["qat_steps"]:
            parts.append(f"qs{self.qat_steps}")
        if self.qat_lr != _DEFAULTS["qat_lr"]:
            parts.append(f"qlr{_num(self.qat_lr)}")
        if self.qat_batch_size != _DEFAULTS["qat_batch_size"]:
            parts.append(f"qbs{self.qat_batch_size}")
        if self.skip:
            parts.append("skip" + "+".join(self.skip))
        parts.extend(rule.label for rule in self.layers)
        if self.layer_formats:
            parts.append("L=" + _encode_layer_list(self.layer_formats))
        if self.embedding_format is not None:
            parts.append("E=" + self.embedding_format)
        if self.head_format is not None:
            parts.append("H=" + self.head_format)
        return "-".join(parts)

    @classmethod
    def from_label(cls, label: str) -> Recipe:
        """Parse a label written by :attr:`label` (any default option may be left out)."""
        if not isinstance(label, str):
            raise RecipeError(f"a recipe label must be a string, got {label!r}")
        parts = label.strip().split("-")
        if len(parts) < 2 or not parts[0]:
            raise RecipeError(f"recipe label {label!r} must start with FORMAT-METHOD, e.g. 'mxint4-gptq'")
        fmt, block = _split_block(parts[0])
        method = parts[1]
        kw: dict[str, Any] = {"weight_format": fmt, "block_size": block, "method": _QAT_INIT.get(method, method),
                              "qat": method in _QAT_INIT}
        rules: list[LayerRule] = []
        for p in parts[2:]:
            if p == "awq":
                kw["awq"] = True
            elif m := re.fullmatch(r"sq([0-9.eE+]+)", p):
                kw["smoothquant_alpha"] = float(m.group(1))
            elif p.startswith("a_"):
                kw["act_format"], kw["act_block_size"] = _split_block(p[2:])
            elif p == "ao":
                kw["act_order"] = True
            elif m := re.fullmatch(r"pd([0-9.eE+]+)", p):
                kw["percdamp"] = float(m.group(1))
            elif m := re.fullmatch(r"gb(\d+)", p):
                kw["gptq_blocksize"] = int(m.group(1))
            elif m := re.fullmatch(r"cal(\d+)x(\d+)", p):
                kw["calib_samples"], kw["calib_seq_len"] = int(m.group(1)), int(m.group(2))
            elif m := re.fullmatch(r"seed(\d+)", p):
                kw["seed"] = int(m.group(1))
            elif m := re.fullmatch(r"qs(\d+)", p):
                kw["qat_steps"] = int(m.group(1))
            elif m := re.fullmatch(r"qlr([0-9.eE+]+)", p):
                kw["qat_lr"] = float(m.group(1))
            elif m := re.fullmatch(r"qbs(\d+)", p):
                kw["qat_batch_size"] = int(m.group(1))
            elif p.startswith("skip") and len(p) > 4:
                kw["skip"] = tuple(p[4:].split("+"))
            elif p.startswith("@"):
                rules.append(LayerRule.parse(p[1:]))
            elif p.startswith("L="):
                kw["layer_formats"] = _decode_layer_list(p[2:])
            elif p.startswith("E=") and len(p) > 2:
                kw["embedding_format"] = p[2:]
            elif p.startswith("H=") and len(p) > 2:
                kw["head_format"] = p[2:]
            else:
                raise RecipeError(f"recipe label {label!r}: unknown segment {p!r}; expected awq, sqA, a_FORMAT, ao, "
                                  "pdX, gbN, calNxL, seedN, qsN, qlrX, qbsN, skipNAME, @PATTERN=FORMAT, L=LIST, "
                                  "E=FORMAT or H=FORMAT")
        kw["layers"] = tuple(rules)
        return cls(**kw)

    # ---- serialisation -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields. Options at their defaults that older versions did not have are left out, so
        the dict of an older recipe is what it always was."""
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["layers"] = [dataclasses.asdict(r) for r in self.layers]
        d["layer_formats"] = [list(e) for e in self.layer_formats]
        for name in _ADDED_FIELDS:
            if d[name] == _FIELD_DEFAULTS[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe dict must be a mapping of field names, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"label"}
        if unknown:
            raise RecipeError(f"recipe has unknown field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        if "weight_format" not in d:
            raise RecipeError(f"recipe {d!r} has no weight_format; give at least a format, e.g. "
                              "{'weight_format': 'mxint4', 'method': 'gptq'}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:
            raise RecipeError(f"recipe {d!r} has a field of the wrong type: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise RecipeError(f"recipe JSON {text!r} does not parse: {exc}") from None
        return cls.from_dict(value)

    @classmethod
    def coerce(cls, recipe: Recipe | str | dict[str, Any]) -> Recipe:
        """A :class:`Recipe` from a Recipe, a label (``"mxint4-gptq"``) or a dict of fields."""
        if isinstance(recipe, cls):
            return recipe
        if isinstance(recipe, str):
            return cls.from_label(recipe)
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        raise RecipeError(f"expected a Recipe, a recipe label or a dict of recipe fields, got "
                          f"{type(recipe).__name__}")

    # ---- resolved values ---------------------------------------------------------------------------------------

    @property
    def weight_block_size(self) -> int | None:
        """The block size actually used for weights (the format's default when ``block_size`` is None)."""
        return resolve_block_size(self.weight_format, self.block_size)

    @property
    def act_block(self) -> int | None:
        return None if self.act_format is None else resolve_block_size(self.act_format, self.act_block_size)

    def columns(self) -> dict[str, Any]:
        """The run-store columns of this recipe (:data:`RECIPE_COLUMNS`; ``method`` is :attr:`method_name`)."""
        return {"weight_format": self.weight_format, "block_size": self.block_size, "method": self.method_name,
                "smoothquant_alpha": self.smoothquant_alpha, "act_format": self.act_format}

    def layer_formats_for(self, names: Sequence[str]) -> list[tuple[str, int | None] | None]:
        """The ``(format, resolved block size)`` of each linear layer in ``names`` (all of ``arch.linear_layers``,
        in order), ``None`` for layers left in full precision.

        Raises :class:`RecipeError` when an explicit per-layer list does not have one entry per layer.
        """
        names = list(names)
        if self.layer_formats:
            if len(self.layer_formats) != len(names):
                raise RecipeError(f"recipe {self.label[:80]} lists {len(self.layer_formats)} per-layer formats, but "
                                  f"the model has {len(names)} linear layers; give one format per layer")
            return [None if f == SKIP else (f, resolve_block_size(f, b)) for f, b in self.layer_formats]
        out: list[tuple[str, int | None] | None] = []
        for name in names:
            rule = next((r for r in self.layers if layer_matches(name, r.pattern)), None)
            if rule is not None:
                out.append(None if rule.weight_format == SKIP
                           else (rule.weight_format, resolve_block_size(rule.weight_format, rule.block_size)))
            elif any(layer_matches(name, p) for p in self.skip):
                out.append(None)
            else:
                out.append((self.weight_format, self.weight_block_size))
        return out


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Recipe)}
_FIELD_DEFAULTS |= {"layers": [], "layer_formats": []}
# fields added after the first run store was written: left out of to_dict() at their defaults
_ADDED_FIELDS = ("awq", "qat", "qat_steps", "qat_lr", "qat_batch_size", "layers", "layer_formats",
                 "embedding_format", "head_format")


def _float(name: str, v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a number, got {v!r}") from None


def _as_rule(r: Any) -> LayerRule:
    if isinstance(r, LayerRule):
        return r
    if isinstance(r, dict):
        return LayerRule(**r)
    if isinstance(r, str):
        return LayerRule.parse(r.removeprefix("@"))
    if isinstance(r, (list, tuple)) and len(r) in (2, 3):
        return LayerRule(*r)
    raise RecipeError(f"a per-layer override must be a LayerRule, 'PATTERN=FORMAT' or (pattern, format), got {r!r}")


def _as_entry(e: Any) -> tuple[str, int | None]:
    if isinstance(e, str):
        return _split_block(e)
    if isinstance(e, (list, tuple)) and len(e) == 2:
        return (str(e[0]), None if e[1] is None else e[1])
    raise RecipeError(f"a per-layer format must be 'FORMAT[_bN]' or (format, block_size), got {e!r}")


def mixed_recipe(base: Recipe, formats: Iterable[tuple[str, int | None] | str]) -> Recipe:
    """``base`` with an explicit format per layer (``"skip"`` for full precision), e.g. from an allocation."""
    return dataclasses.replace(base, layer_formats=tuple(_as_entry(e) for e in formats), layers=(), skip=())


# ---- the evaluation setting ---------------------------------------------------------------------------------------


#: WikiText-2 test windows (of 256 tokens) the FP reference perplexity is measured on when nothing else gives it
#: (:mod:`quantpredict.predict.fp_reference`; ``--fp-windows`` changes it). Here, torch- and pandas-free, so that
#: building the CLI parser does not import the predict package for its help text.
DEFAULT_FP_WINDOWS = 64


@dataclass(frozen=True)
class EvalSetting:
    """How a run is measured: windows of ``seq_len`` tokens, the first ``max_windows`` of them (``None``: the whole
    split), of WikiText-2 test or of a user's text (``text``: the first 12 hex digits of its sha256).

    ``bos``: every window starts with the tokenizer's BOS token (decided per model by encoding a probe string,
    :func:`quantpredict.data.eval_protocol`); the zoo's tokenizer prepends none. WikiText's literal ``<unk>`` is
    always tokenized as text (``split_special_tokens=True``), which changes nothing for a tokenizer without a
    distinct unknown token. The label is part of every run key: ``seq256-w256``, ``seq256-wall-bos``,
    ``seq256-w64-txt1a2b3c4d5e6f``.

    ``text_file``: where the user's text is read (built by :meth:`with_text_file`, which hashes the file once into
    ``text``). It travels with the setting, from the CLI through :func:`quantpredict.runs.collect` and a
    :class:`~quantpredict.runs.RunSpec` to :func:`quantpredict.evaluate.compare`, which checks that the file still
    hashes to ``text``; it is neither compared, hashed nor part of the label (the run key names the text by its
    sha256 prefix alone, wherever the file lies).

    This is the one evaluation-setting object of the package: it lives here, below :mod:`quantpredict.evaluate`, so
    that the torch-free run planning (:mod:`quantpredict.runs.spec`) and the evaluation both take it.
    """

    seq_len: int = 256
    max_windows: int | None = None
    bos: bool = False
    text: str | None = None
    text_file: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise RecipeError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise RecipeError(f"max_windows must be a positive integer (or unset: the whole split), got "
                              f"{self.max_windows!r}")
        if self.text is not None and not re.fullmatch(r"[0-9a-f]{12}", str(self.text)):
            raise RecipeError(f"text must be the 12-hex-digit sha256 prefix of the evaluation text, got {self.text!r}")

    def with_text_file(self, path) -> EvalSetting:
        """This setting measured on a user's UTF-8 text file: ``text`` becomes the first 12 hex digits of its sha256
        (the file read and hashed here, once) and ``text_file`` its path. ``None`` returns the setting unchanged."""
        if path is None:
            return self
        from quantpredict.data import read_text_file

        return dataclasses.replace(self, text=read_text_file(path)[1], text_file=str(path))

    @property
    def label(self) -> str:
        parts = [f"seq{self.seq_len}", f"w{'all' if self.max_windows is None else self.max_windows}"]
        if self.bos:
            parts.append("bos")
        if self.text:
            parts.append(f"txt{self.text}")
        return "-".join(parts)

    @classmethod
    def from_label(cls, label: str) -> EvalSetting:
        m = re.fullmatch(r"seq(\d+)-w(all|\d+)((?:-bos)?)((?:-txt[0-9a-f]{12})?)", str(label))
        if not m:
            raise RecipeError(f"evaluation setting {label!r} must read seqN-wM[-bos][-txtSHA], e.g. 'seq256-w256'")
        return cls(int(m.group(1)), None if m.group(2) == "all" else int(m.group(2)), bool(m.group(3)),
                   m.group(4)[4:] or None)
