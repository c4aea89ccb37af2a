"""The formats as data: one table of element formats and one table of (element, scaling) combinations.

Element formats follow OCP Microscaling (MX) v1.0 and OCP 8-bit FP (OFP8): an FP element has ``ebits`` exponent
and ``mbits`` stored mantissa bits; its grid is {0} U {2^e * (1 + k/2^mbits)} for normal exponents
``emin_elem <= e <= emax_elem`` U {2^emin_elem * k/2^mbits} (subnormals), truncated at ``max_normal``. The largest
normal is listed explicitly because the formats differ in which top codes they reserve: E4M3 keeps only
S.1111.111 for NaN (so 448, not 480), E5M2 reserves its top exponent for Inf/NaN like IEEE (57344), and the MX-only
FP6/FP4 elements reserve nothing (28, 7.5, 6). An integer element is a signed integer times a fixed ``step``,
clamped symmetrically to +-max_normal (two's complement's extra negative code is not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantpredict.errors import FormatError

MX_BLOCK = 32  # OCP MX v1.0 block size
E8M0_BITS = 8  # MX shared scale: an 8-bit power of two
CHANNEL_SCALE_BITS = 16  # int/fp8 scales are stored as fp16 by the usual kernels (GPTQ, FBGEMM fp8 rowwise)


@dataclass(frozen=True)
class Element:
    """One element format (without scaling)."""

    kind: str  # "fp" | "int"
    bits: int
    ebits: int
    mbits: int  # fp: stored mantissa bits; int: magnitude bits (bits - 1)
    emax: int  # fp: largest normal exponent; int: floor(log2(max_normal))
    emin: int  # fp: smallest normal exponent; int: log2(step)
    max_normal: float

    @property
    def step(self) -> float:
        """The smallest positive value: the subnormal step for fp, the grid step for int."""
        return 2.0 ** (self.emin - self.mbits) if self.kind == "fp" else 2.0**self.emin


def _fp(ebits: int, mbits: int, max_normal: float, emax: int) -> Element:
    bias = 2 ** (ebits - 1) - 1
    return Element("fp", 1 + ebits + mbits, ebits, mbits, emax, 1 - bias, max_normal)


def _int(bits: int, step_exp: int) -> Element:
    qmax = 2 ** (bits - 1) - 1
    max_normal = qmax * 2.0**step_exp
    return Element("int", bits, 0, bits - 1, math.floor(math.log2(max_normal)), step_exp, max_normal)


# The single table of element formats. Integer elements of MXINT-K carry an implicit step 2^-(K-2) (so a block's
# largest value, scaled into [1, 2), uses the full range); plain intK elements are integers (step 1).
ELEMENTS: dict[str, Element] = {
    "e4m3": _fp(4, 3, 448.0, 8),
    "e5m2": _fp(5, 2, 57344.0, 15),
    "e3m2": _fp(3, 2, 28.0, 4),
    "e2m3": _fp(2, 3, 7.5, 2),
    "e2m1": _fp(2, 1, 6.0, 2),
    "bf16": _fp(8, 7, float.fromhex("0x1.fep127"), 127),
    "fp16": _fp(5, 10, 65504.0, 15),
    **{f"mxint{k}": _int(k, -(k - 2)) for k in range(2, 9)},
    **{f"int{k}": _int(k, 0) for k in range(2, 9)},
}


@dataclass(frozen=True)
class Format:
    """A named number format: an element format plus how its scales are shared.

    ``family``: "mx" (blocks along ``axis`` share an E8M0 power-of-two scale), "int" / "fp8" (one scale per channel,
    or per group of ``block_size``, mapping max|x| to ``max_normal``), "float" (a plain cast, no scale).
    """

    name: str
    family: str
    element: str  # "int" | "fp"
    element_bits: int
    ebits: int
    mbits: int
    emax_elem: int
    emin_elem: int
    max_normal: float
    default_block_size: int | None  # 32 for MX; None = per channel (int, fp8) or no scale (float)
    scale_bits: int  # bits of one scale: 8 (E8M0), 16 (fp16 scale of a channel/group), 0 (no scale)
    element_format: str  # key into ELEMENTS

    @property
    def step(self) -> float:
        return ELEMENTS[self.element_format].step

    def bits_per_element(self, block_size: int | None = None, row_length: int | None = None) -> float:
        """Storage bits per element, scales included.

        ``block_size`` None means the default (32 for MX; one scale per channel for int/fp8). A per-channel scale
        costs ``scale_bits / row_length`` per element when ``row_length`` is given (else it is counted as 0); given
        ``row_length``, a shorter last block is counted as one more scale.
        """
        if self.family == "float":
            return float(self.element_bits)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise FormatError(f"block_size must be a positive integer, got {block_size!r}")
        if row_length is not None and (not isinstance(row_length, int) or row_length < 1):
            raise FormatError(f"row_length must be a positive integer, got {row_length!r}")
        block = block_size if block_size is not None else self.default_block_size
        if block is None:  # per channel
            return self.element_bits + (self.scale_bits / row_length if row_length else 0.0)
        if row_length:
            return self.element_bits + self.scale_bits * math.ceil(row_length / block) / row_length
        return self.element_bits + self.scale_bits / block


def _make(name: str, family: str, element_format: str) -> Format:
    el = ELEMENTS[element_format]
    block = MX_BLOCK if family == "mx" else None
    scale_bits = {"mx": E8M0_BITS, "int": CHANNEL_SCALE_BITS, "fp8": CHANNEL_SCALE_BITS, "float": 0}[family]
    return Format(name, family, el.kind, el.bits, el.ebits, el.mbits, el.emax, el.emin, el.max_normal, block,
                  scale_bits, element_format)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        _make("mxfp8_e4m3", "mx", "e4m3"),
        _make("mxfp8_e5m2", "mx", "e5m2"),
        _make("mxfp6_e3m2", "mx", "e3m2"),
        _make("mxfp6_e2m3", "mx", "e2m3"),
        _make("mxfp4_e2m1", "mx", "e2m1"),
        *[_make(f"mxint{k}", "mx", f"mxint{k}") for k in range(8, 1, -1)],
        *[_make(f"int{k}", "int", f"int{k}") for k in range(8, 1, -1)],
        _make("fp8_e4m3", "fp8", "e4m3"),
        _make("fp8_e5m2", "fp8", "e5m2"),
        _make("bf16", "float", "bf16"),
        _make("fp16", "float", "fp16"),
    ]
}


def list_formats() -> list[str]:
    """Every format name, MX first, then int, fp8, and the plain float casts."""
    return list(FORMATS)


def get_format(name: str | Format) -> Format:
    """The :class:`Format` called ``name``; a :class:`FormatError` listing the valid names if there is none."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def format_rows(block_size: int = 128, row_length: int = 4096) -> list[dict[str, object]]:
    """One row per format: kind, element bits, default block, bits per element at the default block and at
    ``block_size`` (per-channel scales spread over ``row_length`` elements)."""
    rows = []
    for f in FORMATS.values():
        scaled = f.family != "float"
        rows.append({
            "format": f.name,
            "family": f.family,
            "element": f"{f.element} E{f.ebits}M{f.mbits}" if f.element == "fp" else f"int{f.element_bits}",
            "element bits": f.element_bits,
            "max element": f.max_normal,
            "scale": {"mx": "E8M0 per block", "int": "fp16 per channel", "fp8": "fp16 per channel"}.get(f.family, "-"),
            "default block": f.default_block_size or ("channel" if scaled else "-"),
            "bits/elem (default)": f.bits_per_element(row_length=row_length),
            f"bits/elem (block {block_size})": f.bits_per_element(block_size, row_length) if scaled else
            f.bits_per_element(),
        })
    return rows
