"""The quantization recipe: what to quantize, in which format, by which method, with which calibration.

A :class:`Recipe` is a frozen dataclass with a stable, parseable label (``mxfp4_e2m1-gptq-sq0.5-a_mxint8``) that keys
everything stored or cached about a quantized model. Only options that differ from their defaults appear in the
label, so adding an option with a default later keeps every existing label valid.

Label grammar (segments joined by ``-``; format and module names never contain ``-``)::

    WEIGHT[_bN]-METHOD[-sqALPHA][-a_ACT[_bN]][-ao][-pdX][-gbN][-calNxL][-seedN][-skipNAME+NAME...]

``_bN`` is a block size other than the format's default, ``ao`` GPTQ's act_order, ``pd`` its damping, ``gb`` its
lazy-batch block size, ``cal`` the number and length of calibration windows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from quantpredict.errors import FormatError

METHODS: tuple[str, ...] = ("rtn", "gptq")

_DEFAULTS = {
    "calib_samples": 128,
    "calib_seq_len": 256,
    "gptq_blocksize": 128,
    "percdamp": 0.01,
    "seed": 0,
}


def _num(x: float) -> str:
    """A short, exact text for a float: 0.5 -> '0.5', 1.0 -> '1', 0.01 -> '0.01'."""
    return format(float(x), "g") if float(x) == float(format(float(x), "g")) else repr(float(x))


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Attributes:
        weight_format: a :mod:`quantpredict.formats` name (``mxint4``, ``mxfp4_e2m1``, ``int4``, ``bf16`` ...).
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

    def __post_init__(self) -> None:
        # normalise types first (JSON gives lists, argparse may give ints for floats)
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.smoothquant_alpha is not None:
            object.__setattr__(self, "smoothquant_alpha", float(self.smoothquant_alpha))
        object.__setattr__(self, "percdamp", float(self.percdamp))
        self._validate()
        # an explicit default block size is the same recipe as None: one recipe, one label, one equality
        from quantpredict.formats import get_format

        if self.block_size is not None and self.block_size == get_format(self.weight_format).default_block_size:
            object.__setattr__(self, "block_size", None)
        if self.act_block_size is not None and self.act_block_size == get_format(self.act_format).default_block_size:
            object.__setattr__(self, "act_block_size", None)

    def _validate(self) -> None:
        from quantpredict.formats import get_format

        get_format(self.weight_format)  # raises FormatError listing the valid names
        if self.act_format is not None:
            get_format(self.act_format)
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; valid methods: {', '.join(METHODS)}")
        for name in ("block_size", "act_block_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise FormatError(f"{name} must be a positive integer or None (the format's default), got {v!r}")
        if self.act_block_size is not None and self.act_format is None:
            raise ValueError("act_block_size is set but act_format is None; pass an act_format or drop act_block_size")
        a = self.smoothquant_alpha
        if a is not None and not 0.0 <= a <= 1.0:
            raise ValueError(f"smoothquant_alpha must lie in [0, 1] (0.5 is the usual choice), got {a}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise ValueError(f"need calib_samples >= 1 and calib_seq_len >= 2, got {self.calib_samples} and "
                             f"{self.calib_seq_len}")
        if self.gptq_blocksize < 1:
            raise ValueError(f"gptq_blocksize must be >= 1, got {self.gptq_blocksize}")
        if not self.percdamp >= 0.0:
            raise ValueError(f"percdamp must be >= 0 (0.01 is the usual choice), got {self.percdamp}")
        for s in self.skip:
            if not s or "-" in s or "+" in s:
                raise ValueError(f"skip entry {s!r} must be a non-empty module name or pattern without '-' or '+'")

    # ---- labels ------------------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """Short stable name, e.g. ``mxfp4_e2m1-gptq-sq0.5-a_mxint8`` or ``mxint4_b128-rtn``."""
        parts = [_with_block(self.weight_format, self.block_size), self.method]
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
        if self.skip:
            parts.append("skip" + "+".join(self.skip))
        return "-".join(parts)

    @classmethod
    def from_label(cls, label: str) -> Recipe:
        """Parse a label written by :attr:`label` (any default option may be left out)."""
        parts = label.strip().split("-")
        if len(parts) < 2:
            raise ValueError(f"recipe label {label!r} must start with FORMAT-METHOD, e.g. 'mxint4-gptq'")
        fmt, block = _split_block(parts[0])
        kw: dict[str, Any] = {"weight_format": fmt, "block_size": block, "method": parts[1]}
        for p in parts[2:]:
            if m := re.fullmatch(r"sq([0-9.eE+]+)", p):
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
            elif p.startswith("skip") and len(p) > 4:
                kw["skip"] = tuple(p[4:].split("+"))
            else:
                raise ValueError(f"recipe label {label!r}: unknown segment {p!r}; expected sqA, a_FORMAT, ao, pdX, "
                                 "gbN, calNxL, seedN or skipNAME")
        return cls(**kw)

    # ---- serialisation -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"label"}
        if unknown:
            raise ValueError(f"recipe has unknown field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    # ---- resolved values ---------------------------------------------------------------------------------------

    @property
    def weight_block_size(self) -> int | None:
        """The block size actually used for weights (the format's default when ``block_size`` is None)."""
        return resolve_block_size(self.weight_format, self.block_size)

    @property
    def act_block(self) -> int | None:
        return None if self.act_format is None else resolve_block_size(self.act_format, self.act_block_size)


def resolve_block_size(fmt: str, block_size: int | None) -> int | None:
    """``block_size``, or the format's default (32 for MX; None, i.e. per channel, for INT/FP8; None for floats)."""
    from quantpredict.formats import get_format

    return get_format(fmt).default_block_size if block_size is None else block_size


def _with_block(fmt: str, block_size: int | None) -> str:
    from quantpredict.formats import get_format

    if block_size is None or block_size == get_format(fmt).default_block_size:
        return fmt
    return f"{fmt}_b{block_size}"


def _split_block(text: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+?)_b(\d+)", text)
    return (m.group(1), int(m.group(2))) if m else (text, None)
