"""The formats as data: one table of element formats and one table of (element, scaling) combinations.

Element formats follow OCP Microscaling (MX) v1.0 and OCP 8-bit FP (OFP8): an FP element has ``ebits`` exponent
and ``mbits`` stored mantissa bits; its grid is {0} U {2^e * (1 + k/2^mbits)} for normal exponents
``emin_elem <= e <= emax_elem`` U {2^emin_elem * k/2^mbits} (subnormals), truncated at ``max_normal``. The largest
normal is listed explicitly because the formats differ in which top codes they reserve: E4M3 keeps only
S.1111.111 for NaN (so 448, not 480), E5M2 reserves its top exponent for Inf/NaN like IEEE (57344), and the MX-only
FP6/FP4 elements reserve nothing (28, 7.5, 6). An integer element is a signed integer times a fixed ``step``,
clamped symmetrically to +-max_normal (two's complement's extra negative code is not used), except ``int6_full``
and ``int5_full`` (llama.cpp's Q6_K codes, -32..31, and Q5_0 codes, -16..15). A ``uint`` element is an unsigned
integer 0..2^k-1 (the codes of asymmetric formats, which subtract a zero point or a min), and a ``table`` element is
a list of code values (NF4).

The formats shipped in checkpoints (see :mod:`quantpredict.formats.asym`, :mod:`~quantpredict.formats.nf4` and
:mod:`~quantpredict.formats.ggml`) are rows of the same format table, with the extra storage their layouts need
(zero points, sub-block scales, second-level scales) counted by :meth:`Format.bits_per_element`. So are the
formats that scale a whole tensor first (:mod:`~quantpredict.formats.tensor_scale`): NVIDIA's NVFP4 and FP8 E4M3 with
one scale per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantpredict.errors import FormatError

MX_BLOCK = 32  # OCP MX v1.0 block size
E8M0_BITS = 8  # MX shared scale: an 8-bit power of two
CHANNEL_SCALE_BITS = 16  # int/fp8 scales are stored as fp16 by the usual kernels (GPTQ, FBGEMM fp8 rowwise)
ASYM_GROUP = 128  # default group of the asymmetric uintK formats: what GPTQ/AWQ checkpoints on hubs almost all use
NF4_BLOCK = 64  # bitsandbytes' default block for NF4
NF4_DQ_BLOCK = 256  # bitsandbytes' double quantization: absmaxes quantized to 8 bits in blocks of 256
QK_K = 256  # llama.cpp k-quant super-block
QK8_0 = 32  # llama.cpp Q8_0 block
QK5 = 32  # llama.cpp Q5_0 / Q5_1 block
NVFP4_BLOCK = 16  # NVIDIA NVFP4: one E4M3 scale per 16 contiguous elements of a row
TENSOR_SCALE_BITS = 32  # the FP32 scale of a whole tensor (NVFP4's second level; per-tensor FP8's only scale)
QK4 = 32  # llama.cpp Q4_0 / Q4_1 block

# bitsandbytes' NF4 code (bitsandbytes/functional.py, get_4bit_type("nf4")): the float32 values, ascending
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# llama.cpp's IQ4_NL / IQ4_XS code values (kvalues_iq4nl in ggml-common.h), ascending
IQ4NL_VALUES: tuple[float, ...] = (-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0,
                                   53.0, 69.0, 89.0, 113.0)


@dataclass(frozen=True)
class Element:
    """One element format (without scaling)."""

    kind: str  # "fp" | "int" | "uint" | "table"
    bits: int
    ebits: int
    mbits: int  # fp: stored mantissa bits; int: magnitude bits (bits - 1); uint/table: bits
    emax: int  # fp: largest normal exponent; int/uint: floor(log2(max_normal)); table: 0
    emin: int  # fp: smallest normal exponent; int/uint: log2(step); table: 0
    max_normal: float
    min_value: float | None = None  # the smallest value; None: -max_normal (symmetric)
    values: tuple[float, ...] = ()  # table: every code value, ascending

    @property
    def step(self) -> float:
        """The smallest positive value: the subnormal step for fp, the grid step for int/uint, the smallest positive
        code for a table."""
        if self.kind == "table":
            return min(v for v in self.values if v > 0)
        return 2.0 ** (self.emin - self.mbits) if self.kind == "fp" else 2.0**self.emin

    @property
    def lowest(self) -> float:
        """The smallest (most negative) value of the grid."""
        return -self.max_normal if self.min_value is None else self.min_value


def _fp(ebits: int, mbits: int, max_normal: float, emax: int) -> Element:
    bias = 2 ** (ebits - 1) - 1
    return Element("fp", 1 + ebits + mbits, ebits, mbits, emax, 1 - bias, max_normal)


def _int(bits: int, step_exp: int) -> Element:
    qmax = 2 ** (bits - 1) - 1
    max_normal = qmax * 2.0**step_exp
    return Element("int", bits, 0, bits - 1, math.floor(math.log2(max_normal)), step_exp, max_normal)


def _uint(bits: int) -> Element:
    top = 2**bits - 1
    return Element("uint", bits, 0, bits, math.floor(math.log2(top)), 0, float(top), min_value=0.0)


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
    **{f"uint{k}": _uint(k) for k in range(2, 9)},
    "int6_full": Element("int", 6, 0, 5, 4, 0, 31.0, min_value=-32.0),  # llama.cpp Q6_K: -32..31
    "int5_full": Element("int", 5, 0, 4, 3, 0, 15.0, min_value=-16.0),  # llama.cpp Q5_0: -16..15
    "int4_full": Element("int", 4, 0, 3, 2, 0, 7.0, min_value=-8.0),  # llama.cpp Q4_0: -8..7
    "int3_full": Element("int", 3, 0, 2, 1, 0, 3.0, min_value=-4.0),  # llama.cpp Q3_K: -4..3
    "nf4": Element("table", 4, 0, 4, 0, 0, 1.0, min_value=-1.0, values=NF4_VALUES),
    "iq4nl": Element("table", 4, 0, 4, 0, 0, 113.0, min_value=-127.0, values=IQ4NL_VALUES),
}


@dataclass(frozen=True)
class Format:
    """A named number format: an element format plus how its scales are shared.

    ``family``: "mx" (blocks along ``axis`` share an E8M0 power-of-two scale), "int" / "fp8" (one scale per channel,
    or per group of ``block_size``, mapping max|x| to ``max_normal``), "float" (a plain cast, no scale), and the
    layouts shipped in checkpoints: "asym" (AutoGPTQ's min/max quantizer: fp16 scale and an integer zero point per
    group or channel), "nf4" (bitsandbytes NF4, absmax per block, optionally double-quantized), "ggml" (llama.cpp's
    Q8_0 and k-quants, whose block is part of the layout), "tensor" (one FP32 scale per tensor, then for NVFP4 an
    E4M3 scale per block of 16: :mod:`quantpredict.formats.tensor_scale`).
    """

    name: str
    family: str
    element: str  # "int" | "fp" | "uint" | "table"
    element_bits: int
    ebits: int
    mbits: int
    emax_elem: int
    emin_elem: int
    max_normal: float
    default_block_size: int | None  # 32 for MX; None = per channel (int, fp8) or no scale (float)
    scale_bits: int  # bits of one scale: 8 (E8M0), 16 (fp16 scale of a channel/group), 0 (no scale); see below
    element_format: str  # key into ELEMENTS
    # Extra storage of the shipped layouts, per block of ``block_size`` elements unless said otherwise:
    zero_bits: int = 0  # asym: one zero point, stored as a k-bit integer (AutoGPTQ packs qzeros at k bits)
    sub_block: int | None = None  # ggml k-quants: elements per sub-block (32 for q4_k/q5_k, 16 for q6_k)
    sub_scale_bits: int = 0  # ggml k-quants: bits of one sub-block's scale and min (6 + 6) or scale (8)
    scale2_block: int | None = None  # nf4_dq: first-level scales that share one second-level scale (256)
    scale2_bits: int = 0  # nf4_dq: bits of one second-level scale (fp32)
    fixed_block: bool = False  # ggml, tensor: the block is part of the layout (block_size must be None or equal it)
    short_last_block: bool = False  # fixed_block formats whose rows need not be a multiple of the block (NVFP4)
    scale_element: str | None = None  # key into ELEMENTS of a block scale that is a low-precision float (NVFP4: e4m3)
    tensor_scale_bits: int = 0  # bits of one scale shared by the whole tensor (32: FP32), on top of the others

    @property
    def tensor_level(self) -> bool:
        """Whether some of this format's parameters are fitted on the whole tensor (nf4_dq's mean and second-level
        scales, the per-tensor scale of nvfp4 and fp8_e4m3_pt): a slice of a tensor must then take those from the
        whole (:func:`quantpredict.formats.fit_params`'s ``stats_from``), as GPTQ does."""
        return bool(self.scale2_block or self.tensor_scale_bits)

    @property
    def step(self) -> float:
        return ELEMENTS[self.element_format].step

    def check_block(self, block_size: int | None) -> int | None:
        """``block_size`` or the default; a :class:`FormatError` for a bad one (a fixed-layout format accepts only
        its own block)."""
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise FormatError(f"block_size must be a positive integer, got {block_size!r}")
        if self.fixed_block and block_size is not None and block_size != self.default_block_size:
            block = self.default_block_size
            what = f"blocks of {block} elements" if block else "one scale per tensor"
            also = f" (or {block})" if block else ""
            raise FormatError(
                f"{self.name} stores {what} by definition ({_LAYOUT_SOURCE.get(self.family, 'its layout')}); "
                f"got block_size={block_size}: pass block_size=None{also}")
        return self.default_block_size if block_size is None else block_size

    def check_row_length(self, n: int) -> None:
        """A :class:`FormatError` if rows of ``n`` elements cannot be stored in this (fixed-layout) format."""
        block = self.default_block_size
        if self.fixed_block and block and not self.short_last_block and n % block:
            fallback = GGML_FALLBACK.get(self.name)
            hint = f"; llama.cpp would store such a tensor as {fallback} instead" if fallback else ""
            raise FormatError(
                f"{self.name} needs rows whose length is a multiple of {self.default_block_size} (llama.cpp's rule), "
                f"got rows of {n} elements{hint}: pick another format for this tensor (e.g. {fallback or 'int8'}) "
                f"or pad its rows")

    def bits_per_element(self, block_size: int | None = None, row_length: int | None = None) -> float:
        """Storage bits per element, scales included.

        ``block_size`` None means the default (32 for MX, 128 for uintK, 64 for NF4, the layout's for ggml; one scale
        per channel for int/fp8/uintK_pc). A per-channel scale costs ``scale_bits / row_length`` per element when
        ``row_length`` is given (else it is counted as 0); given ``row_length``, a shorter last block is counted as
        one more scale. Zero points count ``zero_bits`` (k) each; k-quant sub-block scales and NF4's second-level
        scales are counted as their layouts store them. One scale per tensor is not counted (it would need the
        tensor's size, and is 32 bits in millions): NF4-DQ's fp32 mean, the FP32 per-tensor scale of nvfp4 and
        fp8_e4m3_pt (``tensor_scale_bits``), so nvfp4 is 4 + 8/16 = 4.5 and fp8_e4m3_pt 8.
        """
        if self.family == "float":
            return float(self.element_bits)
        if row_length is not None and (not isinstance(row_length, int) or row_length < 1):
            raise FormatError(f"row_length must be a positive integer, got {row_length!r}")
        block = self.check_block(block_size)
        if row_length is not None:
            self.check_row_length(row_length)
        per_block = self.scale_bits + self.zero_bits
        if self.scale2_block:
            per_block += self.scale2_bits / self.scale2_block
        sub = self.sub_scale_bits / self.sub_block if self.sub_block else 0.0
        if block is None:  # per channel
            return self.element_bits + (per_block / row_length if row_length else 0.0)
        if row_length:
            return self.element_bits + per_block * math.ceil(row_length / block) / row_length + sub
        return self.element_bits + per_block / block + sub


# llama.cpp's replacement type for a tensor whose rows are not a multiple of the k-quant super-block
# (llama-quant.cpp, "incompatible tensor" fallback)
GGML_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q3_k": "q4_0", "q2_k": "q4_0",
                 "iq4_xs": "iq4_nl"}

# ggml's type id of each llama.cpp layout (enum ggml_type in ggml.h; gguf-py's GGMLQuantizationType): the number a
# GGUF file stores for a tensor of that type
GGML_TYPE_ID = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14,
                "q2_k": 10, "q3_k": 11, "iq4_nl": 20, "iq4_xs": 23}
# who defines the layout of a fixed-block family (for error messages)
_LAYOUT_SOURCE = {"ggml": "llama.cpp's layout", "ggml_act": "llama.cpp's layout",
                  "tensor": "NVIDIA's definition, as ModelOpt and vLLM implement it"}


def _make(name: str, family: str, element_format: str) -> Format:
    el = ELEMENTS[element_format]
    block = MX_BLOCK if family == "mx" else None
    scale_bits = {"mx": E8M0_BITS, "int": CHANNEL_SCALE_BITS, "fp8": CHANNEL_SCALE_BITS, "float": 0}[family]
    return Format(name, family, el.kind, el.bits, el.ebits, el.mbits, el.emax, el.emin, el.max_normal, block,
                  scale_bits, element_format)


def _shipped(name: str, family: str, element_format: str, block: int | None, scale_bits: int, **extra) -> Format:
    el = ELEMENTS[element_format]
    return Format(name, family, el.kind, el.bits, el.ebits, el.mbits, el.emax, el.emin, el.max_normal, block,
                  scale_bits, element_format, **extra)


def _asym(k: int, block: int | None) -> Format:
    name = f"uint{k}" if block else f"uint{k}_pc"
    return _shipped(name, "asym", f"uint{k}", block, CHANNEL_SCALE_BITS, zero_bits=k)


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
        # one FP32 scale per tensor: vLLM's default FP8 weight quantization; NVIDIA's NVFP4 (ModelOpt), whose blocks
        # of 16 also carry an E4M3 scale (a shorter last block of a row is quantized as if zero-padded)
        _shipped("fp8_e4m3_pt", "tensor", "e4m3", None, 0, tensor_scale_bits=TENSOR_SCALE_BITS, fixed_block=True),
        _shipped("nvfp4", "tensor", "e2m1", NVFP4_BLOCK, 8, scale_element="e4m3", tensor_scale_bits=TENSOR_SCALE_BITS,
                 fixed_block=True, short_last_block=True),
        # GPTQ/AWQ-style asymmetric integers: uintK per group (default 128), uintK_pc per output channel
        *[_asym(k, ASYM_GROUP) for k in range(8, 1, -1)],
        *[_asym(k, None) for k in range(8, 1, -1)],
        # bitsandbytes NF4: an fp32 absmax per block of 64; nf4_dq stores the absmaxes as 8-bit codes (blocks of 256)
        _shipped("nf4", "nf4", "nf4", NF4_BLOCK, 32),
        _shipped("nf4_dq", "nf4", "nf4", NF4_BLOCK, 8, scale2_block=NF4_DQ_BLOCK, scale2_bits=32),
        # llama.cpp: Q8_0 (fp16 d per 32), k-quants (fp16 d [and dmin] per 256, sub-block scales [and mins])
        _shipped("q8_0", "ggml", "int8", QK8_0, 16, fixed_block=True),
        # Q5_0 (fp16 d per 32, codes -16..15) and Q5_1 (fp16 d and min per 32): llama.cpp's fallbacks for Q4_K/Q5_K
        _shipped("q5_0", "ggml", "int5_full", QK5, 16, fixed_block=True),
        _shipped("q5_1", "ggml", "uint5", QK5, 32, fixed_block=True),
        # Q4_0 (fp16 d per 32, codes -8..7) and Q4_1 (fp16 d and min per 32): llama.cpp's legacy 4-bit types
        _shipped("q4_0", "ggml", "int4_full", QK4, 16, fixed_block=True),
        _shipped("q4_1", "ggml", "uint4", QK4, 32, fixed_block=True),
        _shipped("q6_k", "ggml", "int6_full", QK_K, 16, sub_block=16, sub_scale_bits=8, fixed_block=True),
        _shipped("q5_k", "ggml", "uint5", QK_K, 32, sub_block=32, sub_scale_bits=12, fixed_block=True),
        _shipped("q4_k", "ggml", "uint4", QK_K, 32, sub_block=32, sub_scale_bits=12, fixed_block=True),
        # Q3_K: fp16 d per 256, 6-bit signed scale per 16; Q2_K: fp16 d and dmin per 256, 4-bit scale and min per 16
        _shipped("q3_k", "ggml", "int3_full", QK_K, 16, sub_block=16, sub_scale_bits=6, fixed_block=True),
        _shipped("q2_k", "ggml", "uint2", QK_K, 32, sub_block=16, sub_scale_bits=8, fixed_block=True),
        # IQ4_NL: fp16 d per 32 times a 16-value non-linear table; IQ4_XS: fp16 d per 256, 6-bit scale per 32
        _shipped("iq4_nl", "ggml", "iq4nl", QK4, 16, fixed_block=True),
        _shipped("iq4_xs", "ggml", "iq4nl", QK_K, 16, sub_block=32, sub_scale_bits=6, fixed_block=True),
        # llama.cpp's activation formats (:mod:`quantpredict.formats.ggml_act`, no weight type): Q8_0 as the x86 CPU
        # backend quantizes matmul inputs; Q8_K (fp32 d per 256, an int16 sum per 16 codes)
        _shipped("q8_0_x86", "ggml_act", "int8", QK8_0, 16, fixed_block=True),
        _shipped("q8_k", "ggml_act", "int8", QK_K, 32, sub_block=16, sub_scale_bits=16, fixed_block=True),
        _make("bf16", "float", "bf16"),
        _make("fp16", "float", "fp16"),
    ]
}


def list_formats() -> list[str]:
    """Every format name: MX first, then int, fp8, the per-tensor-scaled fp8_e4m3_pt and nvfp4, the shipped layouts
    (uintK, uintK_pc, nf4, nf4_dq, q8_0, q5_0, q5_1, q4_0, q4_1, q6_k, q5_k, q4_k, ...), and the plain float casts."""
    return list(FORMATS)


def get_format(name: str | Format) -> Format:
    """The :class:`Format` called ``name``; a :class:`FormatError` listing the valid names if there is none."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


_SCALE_TEXT = {"mx": "E8M0 per block", "int": "fp16 per channel", "fp8": "fp16 per channel"}


def _scale_text(f: Format) -> str:
    if f.family == "asym":
        where = "group" if f.default_block_size else "channel"
        return f"fp16 scale + uint{f.element_bits} zero per {where}"
    if f.family == "nf4":
        return "fp32 absmax per block" if not f.scale2_block else "8-bit absmax per block, fp32 per 256 blocks"
    if f.family == "tensor":
        return "E4M3 per 16, fp32 per tensor" if f.scale_element else "fp32 per tensor"
    if f.family == "ggml_act":
        return "fp16 per 32" if f.name == "q8_0_x86" else "fp32 per 256, int16 sum per 16"
    if f.family == "ggml":
        return {"q8_0": "fp16 per 32", "q5_0": "fp16 per 32", "q5_1": "fp16 d, min per 32",
                "q4_0": "fp16 per 32", "q4_1": "fp16 d, min per 32",
                "q3_k": "fp16 per 256, 6-bit per 16", "iq4_nl": "fp16 per 32",
                "iq4_xs": "fp16 per 256, 6-bit per 32", "q2_k": "fp16 d, dmin per 256; 4-bit scale, min per 16",
                "q6_k": "fp16 per 256, int8 per 16",
                }.get(f.name, "fp16 d, dmin per 256; 6-bit scale, min per 32")
    return _SCALE_TEXT.get(f.family, "-")


def _element_text(f: Format) -> str:
    if f.element == "fp":
        return f"fp E{f.ebits}M{f.mbits}"
    if f.element_format == "int6_full":
        return "int6 (-32..31)"
    if f.element_format == "int5_full":
        return "int5 (-16..15)"
    if f.element_format == "int4_full":
        return "int4 (-8..7)"
    if f.element_format == "int3_full":
        return "int3 (-4..3)"
    if f.element == "int":
        return f"int{f.element_bits}"
    if f.element_format == "iq4nl":
        return "iq4_nl table"
    return "nf4 table" if f.element == "table" else f.element_format


def format_rows(block_size: int = 128, row_length: int = 4096) -> list[dict[str, object]]:
    """One row per format: kind, element bits, default block, bits per element at the default block and at
    ``block_size`` (per-channel scales spread over ``row_length`` elements; "-" where the layout fixes the block)."""
    rows = []
    for f in FORMATS.values():
        scaled = f.family != "float"
        try:
            f.check_row_length(row_length)
            fits = True
        except FormatError:
            fits = False
        at_block: object
        if not scaled:
            at_block = f.bits_per_element()
        elif f.fixed_block:
            at_block = "-"
        else:
            at_block = f.bits_per_element(block_size, row_length)
        rows.append({
            "format": f.name,
            "family": f.family,
            "element": _element_text(f),
            "element bits": f.element_bits,
            "max element": f.max_normal,
            "scale": _scale_text(f),
            "default block": f.default_block_size or (("tensor" if f.family == "tensor" else "channel") if scaled
                                                      else "-"),
            "bits/elem (default)": f.bits_per_element(row_length=row_length if fits else None),
            f"bits/elem (block {block_size})": at_block,
        })
    return rows
