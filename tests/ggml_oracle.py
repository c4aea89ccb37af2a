"""Test helper: llama.cpp's own quantizers (ggml-quants.c) as a shared library, for the optional byte-exactness
tests of tests/test_formats_shipped.py.

Which library: ``$QUANTPREDICT_GGML_REF_LIB`` (a prebuilt libggml-base, which must be built with
``-ffp-contract=off``) when set; else ggml/src/ggml-quants.c of the pinned sdist ``llama_cpp_python-0.3.36.tar.gz``,
found at ``$QUANTPREDICT_LLAMA_CPP_SDIST`` or in ``$QUANTPREDICT_HOME/llama_cpp/`` (default home
``~/.cache/quantpredict``, as :func:`quantpredict.models.imported.imported_root` resolves it), compiled once with
``-O2 -ffp-contract=off`` (no FMA contraction: the C source's float32 semantics) together with stubs for the four
ggml symbols it calls outside quantization (``ggml_abort``, the type-size helpers of its row validation, and
``ggml_row_size`` for the row stride of ``quantize_<t>`` with an importance matrix), and
cached as ``$QUANTPREDICT_HOME/llama_cpp/ggml_quants_<key>.so`` (key: the sdist's hash, flags, compiler). Get the
sdist with ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $QUANTPREDICT_HOME/llama_cpp``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from quantpredict.export import LLAMA_CPP_PYTHON, SDIST
from quantpredict.export import llama_cpp_home as home

FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=gnu11"]
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d: %s\n", file, line, fmt); abort();
}
size_t ggml_row_size(int type, int64_t ne) {  /* quantize_<t> with quant_weights: the row stride */
    switch (type) {
        case 2: return ne / 32 * 18;     /* Q4_0 */
        case 3: return ne / 32 * 20;     /* Q4_1 */
        case 6: return ne / 32 * 22;     /* Q5_0 */
        case 7: return ne / 32 * 24;     /* Q5_1 */
        case 8: return ne / 32 * 34;     /* Q8_0 */
        case 10: return ne / 256 * 84;   /* Q2_K */
        case 11: return ne / 256 * 110;  /* Q3_K */
        case 12: return ne / 256 * 144;  /* Q4_K */
        case 13: return ne / 256 * 176;  /* Q5_K */
        case 14: return ne / 256 * 210;  /* Q6_K */
        default: abort();
    }
}
size_t ggml_type_size(int type) { (void)type; abort(); }
const char * ggml_type_name(int type) { (void)type; return "?"; }
"""
#: llama.cpp's function name for each format: ``quantize_row_<name>_ref`` (what llama-quantize runs without an
#: importance matrix), except the IQ4 types, whose ``quantize_iq4_*(src, dst, nrow, n_per_row, NULL)`` is what
#: llama-quantize calls (quantize_row_iq4_nl_ref searches differently: ntry -1)
NAMES = {"q8_0": "q8_0", "q5_0": "q5_0", "q5_1": "q5_1", "q4_0": "q4_0", "q4_1": "q4_1", "q4_k": "q4_K",
         "q5_k": "q5_K", "q6_k": "q6_K", "q3_k": "q3_K", "q2_k": "q2_K", "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs"}
ROW_API = ("iq4_nl", "iq4_xs")


def sdist_path() -> Path | None:
    p = os.environ.get("QUANTPREDICT_LLAMA_CPP_SDIST")
    cand = Path(p) if p else home() / SDIST
    return cand if cand.is_file() else None


def why_unavailable() -> str | None:
    """None when a library can be had, else the reason (the skip message)."""
    if os.environ.get("QUANTPREDICT_GGML_REF_LIB"):
        return None
    if sdist_path() is None:
        return (f"llama.cpp oracle absent: set QUANTPREDICT_GGML_REF_LIB, or put {SDIST} in {home()} (pip download "
                f"--no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON}) or at "
                "$QUANTPREDICT_LLAMA_CPP_SDIST")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        return "llama.cpp oracle: no C compiler to build ggml-quants.c"
    return None


#: the CPU backend's x86 activation quantizers (``quantize_row_q8_0``/``_q8_1``/``_q8_K`` of ggml-cpu/arch/x86/quants.c,
#: the SIMD code llama.cpp runs on this machine) are built with AVX2 on top, and need stubs of the tables they declare
CPU_SOURCES = ("src/ggml-quants.c", "src/ggml-cpu/arch/x86/quants.c")
CPU_FLAGS = ["-mavx2", "-mf16c", "-mfma"]
CPU_STUBS = STUBS + r"""
float ggml_table_f32_f16[1 << 16];
float ggml_table_f32_e8m0_half[1 << 8];
float ggml_table_f32_ue4m3[1 << 8];
"""


def _build(sdist: Path, target: Path, cc: str, sources: tuple[str, ...] = ("src/ggml-quants.c",),
           flags: list[str] = FLAGS, stubs: str = STUBS) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/ggml/"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                   and (m.name.endswith(".h") or any(m.name.endswith(s) for s in sources))]
        tar.extractall(tmp, members=members, filter="data")
        root = Path(tmp) / prefix
        (Path(tmp) / "stubs.c").write_text(stubs)
        out = Path(tmp) / target.name
        cmd = [cc, *flags, f"-I{root / 'include'}", f"-I{root / 'src'}", f"-I{root / 'src' / 'ggml-cpu'}",
               *[str(root / s) for s in sources], str(Path(tmp) / "stubs.c"), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building {', '.join(sources)} failed: {proc.stderr[-2000:]}")
        os.replace(out, target)


def _built(name: str, sources: tuple[str, ...], flags: list[str], stubs: str) -> ctypes.CDLL:
    sdist = sdist_path()
    assert sdist is not None, why_unavailable()
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    key = hashlib.sha256("\0".join([digest, *sources, *flags, stubs, version]).encode()).hexdigest()[:16]
    target = home() / f"{name}_{key}.so"
    if not target.is_file():
        _build(sdist, target, cc, sources, flags, stubs)
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL:
    """The oracle library (built on first use); call :func:`why_unavailable` first."""
    prebuilt = os.environ.get("QUANTPREDICT_GGML_REF_LIB")
    if prebuilt:
        return ctypes.CDLL(prebuilt)
    return _built("ggml_quants", ("src/ggml-quants.c",), FLAGS, STUBS)


def why_cpu_unavailable() -> str | None:
    """None when :func:`cpu_library` can be built and run here (the sdist, a compiler, an x86 CPU with AVX2, F16C
    and FMA), else the reason."""
    if sdist_path() is None or not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        return why_unavailable() or "llama.cpp oracle: the CPU quantizers need the sdist"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if not {"avx2", "f16c", "fma"} <= flags:
        return "llama.cpp CPU oracle: needs an x86 CPU with AVX2, F16C and FMA (the SIMD quantizers under test)"
    return None


def cpu_library() -> ctypes.CDLL:
    """ggml-quants.c with the CPU backend's x86 SIMD ``quantize_row_q8_0`` / ``_q8_1`` / ``_q8_K`` (built on first
    use, ``-mavx2 -mf16c -mfma``); call :func:`why_cpu_unavailable` first."""
    return _built("ggml_cpu_quants", CPU_SOURCES, [*FLAGS, *CPU_FLAGS], CPU_STUBS)


def quantize_row(lib: ctypes.CDLL, name: str, x: np.ndarray, block: int, size: int) -> np.ndarray:
    """``name(x, y, k)`` (a ``quantize_row_*`` of the library) on float32 ``x`` [rows, n]: uint8 [rows, n / block *
    size]."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
    getattr(lib, name)(ctypes.c_void_p(a.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(a.size))
    return out


def quantize(lib: ctypes.CDLL, fmt: str, x: np.ndarray, block: int, size: int) -> np.ndarray:
    """llama.cpp's bytes for float32 ``x`` [rows, n]: uint8 [rows, n / block * size]."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = a.shape
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    src, dst = ctypes.c_void_p(a.ctypes.data), ctypes.c_void_p(out.ctypes.data)
    if fmt in ROW_API:
        fn = getattr(lib, f"quantize_{NAMES[fmt]}")
        fn.restype = ctypes.c_size_t
        fn(src, dst, ctypes.c_int64(rows), ctypes.c_int64(n), ctypes.c_void_p(None))
    else:
        getattr(lib, f"quantize_row_{NAMES[fmt]}_ref")(src, dst, ctypes.c_int64(a.size))
    return out


def quantize_weighted(lib: ctypes.CDLL, fmt: str, x: np.ndarray, block: int, size: int,
                      quant_weights: np.ndarray) -> np.ndarray:
    """llama.cpp's bytes for float32 ``x`` [rows, n] with an importance matrix: ``quantize_<t>(src, dst, rows, n,
    quant_weights)`` (what llama-quantize calls, ``quant_weights`` float32 [n] the same for every row): uint8 [rows,
    n / block * size]."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    qw = np.ascontiguousarray(quant_weights, dtype=np.float32)
    rows, n = a.shape
    assert qw.shape == (n,), (qw.shape, n)
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    fn = getattr(lib, f"quantize_{NAMES[fmt]}")
    fn.restype = ctypes.c_size_t
    written = fn(ctypes.c_void_p(a.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(rows),
                 ctypes.c_int64(n), ctypes.c_void_p(qw.ctypes.data))
    assert written == out.size, (written, out.size)
    return out


def dequantize(lib: ctypes.CDLL, fmt: str, packed: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's dequantize_row_* of ``packed`` [rows, bytes]: float32 [rows, n]."""
    b = np.ascontiguousarray(packed)
    y = np.zeros((b.shape[0], n), dtype=np.float32)
    getattr(lib, f"dequantize_row_{NAMES[fmt]}")(ctypes.c_void_p(b.ctypes.data), ctypes.c_void_p(y.ctypes.data),
                                                 ctypes.c_int64(y.size))
    return y
