"""quantpredict.imatrix: llama-imatrix's files (GGUF and legacy .dat), written and read back, and the per-column
weights llama-quantize derives from them; optionally against llama.cpp's own tools on SmolLM2 (slow)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantpredict.errors import DataError, OutputError
from quantpredict.imatrix import Imatrix, ImatrixEntry, gguf_bytes, quant_weights, read_imatrix, write_imatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llamacpp_reference as ref  # noqa: E402


def sample() -> Imatrix:
    g = np.random.default_rng(40)
    dense = ImatrixEntry(g.random((1, 64), dtype=np.float32) * 100, np.array([256]))
    experts = ImatrixEntry(g.random((3, 32), dtype=np.float32), np.array([10, 0, 7]))  # expert 1 never routed
    return Imatrix({"blk.0.ffn_down_exps.weight": experts, "blk.0.attn_q.weight": dense},
                   datasets=("wiki.test.raw", "more.txt"), chunk_count=2, chunk_size=128)


def legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], trailer: tuple[int, str] | None) -> bytes:
    """A .dat file as llama-imatrix's save_imatrix_legacy writes it."""
    out = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                values.astype("<f4").tobytes()]
    if trailer is not None:
        out += [struct.pack("<ii", trailer[0], len(trailer[1])), trailer[1].encode()]
    return b"".join(out)


def test_round_trip(tmp_path):
    im = sample()
    back = read_imatrix(write_imatrix(im, tmp_path / "im.gguf"))
    assert back.names == ("blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight")  # sorted, as llama-imatrix writes
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (im.datasets, 2, 128, False)
    for name in im.names:
        np.testing.assert_array_equal(back.entries[name].sums, im.entries[name].sums)
        np.testing.assert_array_equal(back.entries[name].counts, im.entries[name].counts)
        np.testing.assert_array_equal(quant_weights(back, name), quant_weights(im, name))
    assert gguf_bytes(back) == (tmp_path / "im.gguf").read_bytes()


def test_quant_weights_arithmetic():
    im = sample()
    e = im.entries["blk.0.attn_q.weight"]
    w = quant_weights(im, "blk.0.attn_q.weight")
    assert w.dtype == np.float32 and w.shape == (64,)
    np.testing.assert_array_equal(w, e.sums[0] / np.float32(256))  # float32 sum / (float)count
    x = im.entries["blk.0.ffn_down_exps.weight"]
    w = quant_weights(im, "blk.0.ffn_down_exps.weight").reshape(3, 32)
    np.testing.assert_array_equal(w[0], x.sums[0] / np.float32(10))
    np.testing.assert_array_equal(w[1], np.ones(32, dtype=np.float32))  # count 0: llama-quantize's 1
    np.testing.assert_array_equal(w[2], x.sums[2] / np.float32(7))
    with pytest.raises(DataError, match="no entry 'output.weight'"):
        quant_weights(im, "output.weight")


def test_entries_are_read_only():
    e = sample().entries["blk.0.attn_q.weight"]
    with pytest.raises(ValueError):
        e.sums[0, 0] = 1.0
    with pytest.raises(DataError, match="counts"):
        ImatrixEntry(np.ones((2, 4), dtype=np.float32), np.array([1]))


def test_legacy_dat(tmp_path):
    v = np.linspace(0.5, 2.0, 64, dtype=np.float32)
    p = tmp_path / "im.dat"
    p.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (3, v), "blk.0.attn_k.weight": (0, 2 * v)}, (3, "x.txt")))
    im = read_imatrix(p)
    assert im.legacy and im.datasets == ("x.txt",) and im.chunk_count == 3
    np.testing.assert_array_equal(quant_weights(im, "blk.0.attn_q.weight"), v / np.float32(3))  # sum / ncall
    np.testing.assert_array_equal(quant_weights(im, "blk.0.attn_k.weight"), 2 * v)  # ncall 0: as stored
    back = read_imatrix(write_imatrix(im, tmp_path / "im.gguf"))  # GGUF now: the same weights
    assert not back.legacy
    for name in im.names:
        np.testing.assert_array_equal(quant_weights(back, name), quant_weights(im, name))
    p.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (3, v)}, None))  # the trailer is optional
    assert read_imatrix(p).chunk_count == 0


def test_bad_files(tmp_path):
    missing = tmp_path / "none.gguf"
    with pytest.raises(DataError, match="none.gguf"):
        read_imatrix(missing)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00\x00\x00\x00 not an imatrix")
    with pytest.raises(DataError, match="junk.dat.*no entries"):
        read_imatrix(junk)
    junk.write_bytes(struct.pack("<i", 5) + b"\x03\x00")
    with pytest.raises(DataError, match="junk.dat.*truncated"):
        read_imatrix(junk)
    good = gguf_bytes(sample())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.gguf"):
        read_imatrix(cut)
    cut.write_bytes(good[:60])
    with pytest.raises(DataError, match="cut.gguf.*truncated"):
        read_imatrix(cut)
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 9) + good[8:])
    with pytest.raises(DataError, match="v9.gguf.*version 9"):
        read_imatrix(bad)
    with pytest.raises(OutputError, match="no/such/dir"):
        write_imatrix(sample(), tmp_path / "no" / "such" / "dir" / "im.gguf")


def test_gguf_without_metadata_or_counts(tmp_path):
    # what llama.cpp refuses: a GGUF imatrix without its metadata keys (llama-quantize), sums without counts
    im = sample()
    raw = gguf_bytes(im)
    key = b"imatrix.chunk_size"
    p = tmp_path / "nometa.gguf"
    p.write_bytes(raw.replace(key, b"imatrix.chunk_sizX"))
    with pytest.raises(DataError, match="nometa.gguf.*imatrix.chunk_size"):
        read_imatrix(p)
    p = tmp_path / "nocounts.gguf"
    p.write_bytes(raw.replace(b"blk.0.attn_q.weight.counts", b"blk.0.attn_q.weight.countz"))
    with pytest.raises(DataError, match="nocounts.gguf.*blk.0.attn_q.weight has no counts"):
        read_imatrix(p)


def test_gguf_package_reads_ours(tmp_path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(write_imatrix(sample(), tmp_path / "im.gguf")))
    names = [t.name for t in r.tensors]
    assert names == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                     "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    np.testing.assert_array_equal(np.asarray(r.tensors[2].data).reshape(3, 32),
                                  sample().entries["blk.0.ffn_down_exps.weight"].sums)


# --------------------------------------------------------------------------------- against llama.cpp's tools


def _f32_gguf() -> Path | None:
    p = ref.home() / "work" / "smollm2-135m-f32.gguf"
    return p if p.is_file() else None


_TEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path, Path]:
    """llama-imatrix on SmolLM2's F32 GGUF, 2 chunks of 128 tokens, 1 thread: (GGUF file, legacy .dat, work dir)."""
    work = tmp_path_factory.mktemp("imatrix")
    text = work / "small.txt"
    text.write_bytes(_TEXT.read_bytes()[:20000])
    out = ref.imatrix(_f32_gguf(), work / "imatrix.gguf", text=text, chunks=2, ctx=128, threads=1)
    dat = ref.imatrix(_f32_gguf(), work / "imatrix.dat", text=text, chunks=2, ctx=128, threads=1, legacy=True)
    return out, dat, work


def needs_tools(test):
    """Slow, and skipped with the reason without llama.cpp's built tools or SmolLM2's F32 GGUF."""
    marks = [pytest.mark.slow, pytest.mark.llama_cpp,
             pytest.mark.skipif(not ref.built(), reason="llama.cpp's tools are not built: make llamacpp"),
             pytest.mark.skipif(_f32_gguf() is None, reason="no SmolLM2 F32 GGUF: python benchmarks/"
                                "llamacpp_reference.py convert smollm2-135m ~/.cache/quantpredict/llama_cpp/work/"
                                "smollm2-135m-f32.gguf")]
    for m in marks:
        test = m(test)
    return test


def _quantize(src: Path, out: Path, imatrix_dir: Path) -> bytes:
    """llama-quantize Q4_K_M with ``--imatrix imatrix.gguf`` run in ``imatrix_dir`` (the file name it records in
    the output is then the same for two directories)."""
    exe = ref.tool("llama-quantize")
    subprocess.run([str(exe), "--imatrix", "imatrix.gguf", str(src), str(out), "Q4_K_M", "1"], check=True,
                   capture_output=True, cwd=imatrix_dir)
    return out.read_bytes()


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(path)).tensors}


@needs_tools
def test_reads_llama_imatrix_files(made):
    gguf = pytest.importorskip("gguf")
    path, dat, work = made
    im, old = read_imatrix(path), read_imatrix(dat)
    weights = {t.name: t for t in gguf.GGUFReader(str(_f32_gguf())).tensors}
    assert len(im.names) == 210 and set(im.names) == set(old.names)  # SmolLM2's 30 blocks x 7 linear weights
    assert (im.chunk_count, im.chunk_size, im.datasets) == (2, 128, (str(work / "small.txt"),))
    assert old.legacy and old.chunk_count == 2 and old.datasets == im.datasets
    for name in im.names:
        assert name in weights and im.entries[name].sums.shape == (1, int(weights[name].shape[0]))
        assert im.entries[name].counts.tolist() == [256]  # 2 chunks of 128 tokens
        assert old.entries[name].counts.tolist() == [2]  # ncall: the chunks
        # .dat stores (sum / 256) * 2; both give sum / 256 exactly (powers of two)
        np.testing.assert_array_equal(quant_weights(old, name), quant_weights(im, name))
    assert gguf_bytes(im) == path.read_bytes()  # what llama-imatrix wrote, byte for byte


@needs_tools
def test_llama_quantize_takes_our_file(made, tmp_path):
    pytest.importorskip("gguf")
    path, dat, _ = made
    mine, theirs = tmp_path / "ours", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    shutil.copy(path, theirs / "imatrix.gguf")
    write_imatrix(read_imatrix(path), mine / "imatrix.gguf")
    assert _quantize(_f32_gguf(), tmp_path / "theirs.gguf", theirs) == _quantize(_f32_gguf(), tmp_path / "ours.gguf",
                                                                                  mine)
    # the legacy file rewritten as GGUF: the same quantized tensors (the file's metadata names another imatrix)
    write_imatrix(read_imatrix(dat), mine / "imatrix.gguf")
    _quantize(_f32_gguf(), tmp_path / "from-dat.gguf", mine)
    assert _tensor_bytes(tmp_path / "from-dat.gguf") == _tensor_bytes(tmp_path / "theirs.gguf")


@needs_tools
def test_project_blocks_with_llama_imatrix(made, tmp_path):
    # the project's weighted quantizers with quant_weights of llama-imatrix's file give llama-quantize --pure
    # --imatrix's bytes on block 0 (SmolLM2's rows of 576: Q4_K and IQ4_XS fall back to Q5_0 / IQ4_NL but for
    # ffn_down, rows of 1536)
    pytest.importorskip("gguf")
    path, _, _ = made
    for kind in ("q4_k", "q6_k", "iq4_xs"):
        rows = ref.exactness(_f32_gguf(), [kind], pattern=r"blk\.0\.", work=tmp_path, imatrix=path)
        assert len(rows) == 7 and all(r["weighted"] for r in rows)
        assert sum(r["differing"] for r in rows) == 0, rows
