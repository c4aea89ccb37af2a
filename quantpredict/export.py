"""A model quantized by an RTN recipe of llama.cpp types, written as a GGUF file that llama.cpp loads (issue #30).

The file is llama.cpp's own conversion with the recipe's tensors replaced:

1. llama.cpp's converter, ``convert_hf_to_gguf.py`` of the pinned llama-cpp-python sdist (:data:`LLAMA_CPP_PYTHON`,
   unpacked under ``$QUANTPREDICT_HOME/llama_cpp``; fetched with ``pip download`` only when absent), writes an F32
   GGUF of the model in a temporary folder beside the output: every metadata field and the tokenizer exactly as
   llama.cpp writes them, every weight in float32.
2. :func:`rewrite` copies it with the ``gguf`` package (``GGUFReader`` -> ``GGUFWriter``): every key/value field with
   its type and in its order (``general.file_type`` set, ``general.quantization_version`` added), every tensor in its
   order and under its name; each weight the recipe quantizes is packed by
   :func:`quantpredict.formats.ggml.to_gguf_bytes` (bit-exact with llama.cpp's reference quantizer) and stored with
   its ggml type; any linear the recipe leaves unquantized is stored in ``keep`` (F16 by default), and so are the
   token embedding and the output head unless ``embedding_type`` / ``output_type`` name a llama.cpp type (the
   project's recipes keep them in 16 bits, where llama-quantize would quantize them);
   norms, biases and every other tensor as the converter wrote them.
3. The result is renamed onto the output path only when whole.

With an importance matrix (``plan_export(..., imatrix=FILE)``, ``quantpredict export --imatrix``), each tensor of a
llama.cpp type is packed with ``to_gguf_bytes(w, kind, imatrix=quant_weights(im, gguf_name))``, as ``llama-quantize
--imatrix`` quantizes it (byte-identical: tests/test_export.py). Every such linear must have an entry (else an error
naming the file and the tensor, before any work; llama-quantize would log "did not find weights" and quantize it
without, which for a linear means the file is of another model); the token embedding and the output head, when
quantized, take theirs if the file has one and are quantized without otherwise, as llama-quantize does.

The converter reorders the rows of some weights (Llama's q/k projections are permuted into llama.cpp's rope layout,
GPT-NeoX's fused qkv into q, k, v): it moves whole rows, and every ggml type quantizes each row on its own, so the
tensor quantized as it stands in the converted file is the project's fake-quantized weight with its rows moved the
same way (tests/test_export.py checks it bit for bit).

Only RTN: GPTQ, AWQ, SmoothQuant and QAT change the weights beyond each tensor's own rounding, and the file would
need the quantized weights themselves; activation quantization has no place in a GGUF file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from quantpredict.errors import FormatError, ModelError, RecipeError, ResourceError
from quantpredict.gguf_names import gguf_arch_name, gguf_tensor_names, model_gguf_names, require_gguf  # noqa: F401

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
#: where a tensor the recipe does not quantize (token embedding, output head, skipped linears) may be kept
KEEP_TYPES = ("f16", "bf16", "f32")
#: the project's 16-bit formats a per-layer recipe may give a linear (the mixes' F16 fallback), as GGUF types
FLOAT_TYPES = {"fp16": "f16", "bf16": "bf16"}
#: llama_ftype of each named mix (llama-quantize's file type; ``Q4_K`` and ``Q5_K`` are its aliases of the _M ones)
MIX_FILE_TYPE = {"q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S",
                 "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_pure": "MOSTLY_Q4_K_M", "q5_k_pure": "MOSTLY_Q5_K_M",
                 "q6_k_pure": "MOSTLY_Q6_K", "q2_k_mix": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S",
                 "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L", "iq4_xs_mix": "MOSTLY_IQ4_XS"}
#: llama_ftype of a recipe that is not a named mix: that of its most common type (by elements); for the k-quants
#: llama-quantize's alias (``Q4_K`` means Q4_K_M, ``Q3_K`` Q3_K_M, ``Q5_K`` Q5_K_M)
TYPE_FILE_TYPE = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
                  "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M",
                  "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL",
                  "iq4_xs": "MOSTLY_IQ4_XS", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "f32": "ALL_F32"}
KEPT_ROLES = ("token_embd.weight", "output.weight")

# ---- the pinned converter -------------------------------------------------------------------------------------------


def llama_cpp_home() -> Path:
    """``$QUANTPREDICT_HOME/llama_cpp`` (default ``~/.cache/quantpredict/llama_cpp``): the sdist, its unpacked
    source and the tools benchmarks/llamacpp_reference.py builds."""
    h = os.environ.get("QUANTPREDICT_HOME")
    return (Path(h).expanduser() if h else Path.home() / ".cache" / "quantpredict") / "llama_cpp"


def sdist_path() -> Path:
    return llama_cpp_home() / SDIST


def source_dir() -> Path:
    """The vendored llama.cpp of the unpacked sdist (it may not exist yet)."""
    return llama_cpp_home() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def fetch_sdist(*, download: bool = True) -> Path:
    """The pinned sdist, downloaded with ``pip download`` (the package registry) only when it is not there yet."""
    path = sdist_path()
    if path.is_file():
        return path
    if not download:
        raise ResourceError(f"llama.cpp's converter is not here: {path} is missing; get it with `pip download "
                            f"--no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON} -d {path.parent}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(path.parent)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise ResourceError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON}'s sdist (llama.cpp's "
                            f"converter) with pip: {tail or 'no file'}; put {SDIST} in {path.parent} by hand")
    return path


def unpack(sdist: Path) -> Path:
    """:func:`source_dir`, extracted from ``sdist`` when it is not there: into a temporary folder first, renamed
    when whole, so an interrupted extraction leaves no half source tree behind."""
    top = source_dir().parent.parent
    if (source_dir() / "convert_hf_to_gguf.py").is_file():
        return source_dir()
    if top.exists():
        raise ResourceError(f"{top} exists but holds no vendor/llama.cpp/convert_hf_to_gguf.py; remove it and run "
                            "again to unpack the sdist afresh")
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=top.parent))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.rename(tmp / top.name, top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source_dir()


def converter_dir(*, download: bool = True) -> Path:
    """The vendored llama.cpp holding ``convert_hf_to_gguf.py``: unpacked (and the sdist fetched) when absent."""
    if (source_dir() / "convert_hf_to_gguf.py").is_file():
        return source_dir()
    return unpack(fetch_sdist(download=download))


# Python packages the converter imports beyond quantpredict's own dependencies (torch, numpy, transformers; gguf-py
# comes with its source). sentencepiece is imported by the Llama vocabulary reader before it looks for a
# tokenizer.model, so even a model without one (the zoo's, SmolLM2) needs it. They are the `export` extra.
CONVERTER_PACKAGES = ("sentencepiece",)


def converter_missing_packages() -> list[str]:
    """The :data:`CONVERTER_PACKAGES` that cannot be imported here."""
    import importlib.util

    return [name for name in CONVERTER_PACKAGES if importlib.util.find_spec(name) is None]


def check_converter_packages() -> None:
    """A :class:`ResourceError` naming the fix when a package the converter imports is missing (checked before the
    sdist is fetched or unpacked)."""
    missing = converter_missing_packages()
    if missing:
        raise ResourceError(f"llama.cpp's convert_hf_to_gguf.py imports {', '.join(missing)}, which is not "
                            "installed: pip install 'quantpredict[export]' (or make setup-export)")


def converter_available() -> bool:
    """Whether the converter can run here without downloading: its sdist or unpacked source, and the
    :data:`CONVERTER_PACKAGES` it imports."""
    return ((source_dir() / "convert_hf_to_gguf.py").is_file() or sdist_path().is_file()) \
        and not converter_missing_packages()


_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)", re.S)


def converter_architectures(src: Path) -> set[str]:
    """The Hugging Face architecture classes the converter in ``src`` registers a model class for."""
    names: set[str] = set()
    files = [src / "convert_hf_to_gguf.py", *sorted((src / "conversion").glob("*.py"))]
    for f in files:
        if f.is_file():
            for m in _REGISTER.finditer(f.read_text(errors="replace")):
                names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", m.group(1)))
    return names


def gpt2_byte_level(model_dir: Path) -> bool:
    """Whether the model's ``tokenizer.json`` pre-tokenizes exactly as GPT-2 does (byte-level with GPT-2's regex, no
    prefix space, no normalizer): llama.cpp's ``gpt-2`` pre-tokenizer."""
    try:
        doc = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = doc.get("pre_tokenizer") or {}
    return (doc.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and (doc.get("model") or {}).get("type") == "BPE")


# The converter run in a child process, as its own __main__, with one addition: a byte-level BPE tokenizer whose
# pre-tokenizer is GPT-2's but whose vocabulary the converter does not know by its hash (the project's zoo
# tokenizer) is written as llama.cpp's "gpt-2" pre-tokenizer instead of failing. Every other path is the
# converter's own.
_RUNNER = r"""
import json, runpy, sys
from pathlib import Path
src, gpt2_like = Path(sys.argv[1]), sys.argv[2] == "1"
sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[3:]]
sys.path.insert(0, str(src))
sys.path.insert(1, str(src / "gguf-py"))
if gpt2_like:
    import conversion.base as base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            print("QUANTPREDICT_PRE_TOKENIZER gpt-2", file=sys.stderr, flush=True)
            return "gpt-2"
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Conversion:
    path: Path
    pre_tokenizer_fallback: bool  # the tokenizer's pre-tokenizer was named gpt-2 by its shape, not its hash
    log: str


def converter_command(model_dir: Path, out: Path, outtype: str, src: Path) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` of llama.cpp's ``convert_hf_to_gguf.py`` (unpacked at ``src``) on ``model_dir``,
    writing ``out`` in ``outtype``, as :func:`convert` runs it (benchmarks time the same command)."""
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", _RUNNER, str(src), "1" if gpt2_byte_level(model_dir) else "0", str(model_dir),
           "--outfile", str(out), "--outtype", outtype]
    return cmd, env


def convert(model_dir: Path, out: Path, outtype: str = "f32", *, src: Path | None = None) -> Conversion:
    """llama.cpp's ``convert_hf_to_gguf.py`` on ``model_dir``, writing ``out`` in ``outtype`` (f32: the checkpoint's
    weights exactly); its log is kept, and shown in the error when it fails. An interrupt stops the child too."""
    cmd, env = converter_command(model_dir, out, outtype, src or converter_dir())
    log_path = out.with_name(out.name + ".log")
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out.parent))
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        log.seek(0)
        text = log.read()
    log_path.unlink(missing_ok=True)
    if code != 0 or not out.is_file():
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise ModelError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir} (exit {code}): "
                         f"{' | '.join(lines[-3:]) or 'no output'}")
    return Conversion(out, "QUANTPREDICT_PRE_TOKENIZER gpt-2" in text, text)


# ---- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportLayer:
    """One linear layer of the model and the type it is written in (a ggml type name, or ``keep``'s)."""

    name: str  # the Hugging Face module name
    kind: str  # q4_k, q8_0, ..., f16 (the project's fp16), bf16, or the keep type for a layer left unquantized
    in_features: int
    out_features: int
    quantized: bool


@dataclass(frozen=True)
class ExportPlan:
    """What :func:`export_gguf` writes, known from the model's config and the recipe alone (no weights)."""

    model: str
    model_dir: Path
    recipe_label: str
    mix: str | None  # the named mix the recipe is, if it is one
    layers: tuple[ExportLayer, ...]
    keep: str
    hf_architecture: str
    file_type: str  # gguf.LlamaFileType member name
    embedding_type: str = ""  # the token embedding's type: a ggml type or a keep type ("": ``keep``)
    output_type: str = ""  # the output head's (untied models; a tied head is the embedding): as above
    imatrix_file: str = ""  # llama-quantize's --imatrix FILE ("" without an imatrix)
    imatrix_label: str | None = None  # the imatrix's name and hash (quantpredict.imatrix.imatrix_label)
    # GGUF tensor name -> the float32 [n] quant_weights it is quantized with (the tensors of a llama.cpp type that
    # the imatrix has an entry for)
    imatrix_weights: Mapping[str, Any] = dc_field(default_factory=dict, compare=False, repr=False)

    def role_type(self, gguf_name: str) -> str:
        """The type ``token_embd.weight`` or ``output.weight`` is written in."""
        chosen = self.embedding_type if gguf_name == "token_embd.weight" else self.output_type
        return chosen or self.keep

    @property
    def llama_quantize_type(self) -> str:
        """llama-quantize's TYPE argument for :attr:`file_type` (``Q4_K_M``, ``Q8_0``, ``F16``)."""
        return self.file_type.removeprefix("MOSTLY_").removeprefix("ALL_")


def _refuse_non_rtn(recipe: Any, shown: str) -> None:
    what = []
    if recipe.method != "rtn":
        what.append(f"method {recipe.method}")
    if recipe.qat:
        what.append("QAT")
    if recipe.awq:
        what.append("AWQ")
    if recipe.smoothquant_alpha is not None:
        what.append("SmoothQuant")
    if what:
        raise RecipeError(f"recipe {shown}: export writes round-to-nearest (RTN) weights only, and "
                          f"{' and '.join(what)} changes the weights beyond each tensor's own rounding; export the "
                          "RTN recipe, or save the model with `quantpredict quantize` and evaluate it there")
    if recipe.act_format is not None:
        raise RecipeError(f"recipe {shown}: a GGUF file holds weights only; drop the activation format "
                          f"a_{recipe.act_format}")


def _role_type(what: str, kind: str | None, row: int) -> str:
    """``kind`` checked as the type of the token embedding or output head (rows of ``row`` elements): a keep type or
    a llama.cpp type whose block tiles the rows; ``""`` for None (the keep type)."""
    from quantpredict.formats.table import GGML_TYPE_ID, get_format

    if kind is None:
        return ""
    kind = kind.lower()
    if kind in KEEP_TYPES:
        return kind
    if kind not in GGML_TYPE_ID:
        raise RecipeError(f"{what} type {kind!r}: give a llama.cpp type ({', '.join(sorted(GGML_TYPE_ID))}) or one "
                          f"of {', '.join(KEEP_TYPES)}")
    try:
        get_format(kind).check_row_length(row)
    except FormatError as exc:
        raise RecipeError(f"{what} type {kind}: {exc}") from None
    return kind


def _recipe_roles(net: Any, recipe: Any, embedding_type: str | None,
                  output_type: str | None) -> tuple[str | None, str | None]:
    """The embedding and head types: the ones given, else the recipe's ``embedding_format`` / ``head_format`` (a
    tied model's one matrix is the file's ``token_embd``). A type given that contradicts the recipe's is a
    :class:`RecipeError`: the file would not be the recipe that was priced and measured."""
    from quantpredict.quantize.plan import embedding_and_head_plan

    for m in embedding_and_head_plan(net, recipe):
        role, given = (("token embedding", embedding_type) if m.role != "head" else ("output head", output_type))
        if given is not None and given.lower() != m.weight_format:
            raise RecipeError(f"the {role} type {given} contradicts the recipe's {m.weight_format} "
                              f"({recipe.label[-40:]}); drop the option or the recipe's E=/H= part")
        if m.role == "head":
            output_type = m.weight_format
        else:
            embedding_type = m.weight_format
    return embedding_type, output_type


def plan_export(model: str, recipe: Any, *, keep: str = "f16", embedding_type: str | None = None,
                output_type: str | None = None, imatrix: Any = None) -> ExportPlan:
    """Check that ``recipe`` (a named mix, a label, a :class:`~quantpredict.recipe.Recipe` or a dict of fields)
    quantizes every layer of ``model`` it quantizes by RTN to a ggml type (or fp16) whose block tiles its rows; from
    the model's config alone, before any work. A :class:`RecipeError` says what is wrong. Whether llama.cpp's
    converter knows the architecture is :func:`check_converter`'s (it needs the converter's source).

    ``embedding_type`` / ``output_type``: the type of the token embedding / output head (a llama.cpp type such as
    ``q8_0`` or ``q6_k``, as llama-quantize's ``--token-embedding-type`` / ``--output-tensor-type``; default
    ``keep``), or the recipe's own ``embedding_format`` / ``head_format`` where it sets them (an option that
    contradicts them is an error). Quantizing them here is for files the size of llama.cpp's own. Where the
    converted file has no output tensor (a head tied to the embedding, which llama.cpp then reads as the head),
    ``output_type`` has nothing to apply to: the result's ``kept`` lists the tensors there are.

    ``imatrix`` (an :class:`~quantpredict.imatrix.Imatrix` or the path of a llama-imatrix file): quantize each
    tensor of a llama.cpp type as ``llama-quantize --imatrix`` does (:func:`_imatrix_weights`), read and checked
    here, before any work. Named mixes resolve as llama.cpp does without an imatrix (``iq4_xs_mix``'s first
    ffn_down layers in Q5_K; llama-quantize with an imatrix would keep them IQ4_XS, and gives Q4_0/Q5_0 files'
    first ffn_down layers Q4_1/Q5_1): the file has the recipe's types, and the printed llama-quantize command names
    every linear's type, so both tools write the same types."""
    from quantpredict import arch
    from quantpredict.formats.table import GGML_TYPE_ID, get_format
    from quantpredict.mixes import is_mix_spec, mix_of, resolve_recipe
    from quantpredict.models import resolve, skeleton
    from quantpredict.quantize.plan import layer_plan

    if keep not in KEEP_TYPES:
        raise RecipeError(f"keep type {keep!r}: give one of {', '.join(KEEP_TYPES)}")
    require_gguf()
    model_dir = resolve(model)
    config = json.loads((model_dir / "config.json").read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    net = skeleton(model)
    hidden = int(net.get_input_embeddings().weight.shape[1])
    shown = recipe if isinstance(recipe, str) else getattr(recipe, "label", str(recipe))
    resolved = resolve_recipe(recipe, net)
    embedding_type, output_type = _recipe_roles(net, resolved, embedding_type, output_type)
    embedding_type = _role_type("token embedding", embedding_type, hidden)
    output_type = _role_type("output head", output_type, hidden)
    _refuse_non_rtn(resolved, shown if len(str(shown)) < 60 else resolved.label[:60] + "...")
    planned = {p.ref.name: p for p in layer_plan(net, resolved)}
    layers = []
    for ref in arch.linear_layers(net):
        p = planned.get(ref.name)
        if p is None:
            layers.append(ExportLayer(ref.name, keep, ref.in_features, ref.out_features, False))
            continue
        fmt = p.weight_format
        if fmt in FLOAT_TYPES:
            layers.append(ExportLayer(ref.name, FLOAT_TYPES[fmt], ref.in_features, ref.out_features, True))
            continue
        if fmt not in GGML_TYPE_ID:
            raise RecipeError(f"recipe {shown}: layer {ref.name} is {fmt}, which is not a llama.cpp type; export "
                              f"takes recipes of llama.cpp types only ({', '.join(sorted(GGML_TYPE_ID))}, and fp16) "
                              "or a named mix")
        f = get_format(fmt)
        if p.block_size not in (None, f.default_block_size):
            raise RecipeError(f"recipe {shown}: layer {ref.name} asks {fmt} with blocks of {p.block_size}; "
                              f"llama.cpp's {fmt} has blocks of {f.default_block_size}")
        try:
            f.check_row_length(ref.in_features)
        except FormatError as exc:  # it names llama.cpp's fallback type, which the named mixes apply themselves
            raise RecipeError(f"recipe {shown}: layer {ref.name}: {exc} (a named mix falls back by itself)") from None
        layers.append(ExportLayer(ref.name, fmt, ref.in_features, ref.out_features, True))
    mix = recipe if isinstance(recipe, str) and is_mix_spec(recipe) else mix_of(resolved, net)
    if mix is not None:
        file_type = MIX_FILE_TYPE[mix.split("-")[0].lower()]
    else:
        sizes: Counter[str] = Counter()
        for layer in layers:
            if layer.quantized:
                sizes[layer.kind] += layer.in_features * layer.out_features
        file_type = TYPE_FILE_TYPE[sizes.most_common(1)[0][0] if sizes else keep]
    weights, im_file, im_label = {}, "", None
    if imatrix is not None:
        weights = _imatrix_weights(imatrix, config, net, model, layers, embedding_type, output_type, hidden)
        from quantpredict.imatrix import imatrix_label

        im_file = str(imatrix) if isinstance(imatrix, (str, os.PathLike)) else "IMATRIX.gguf"
        im_label = imatrix_label(imatrix)
    return ExportPlan(model, model_dir, resolved.label, mix, tuple(layers), keep, hf_arch, file_type, embedding_type,
                      output_type, im_file, im_label, weights)


def _imatrix_weights(imatrix: Any, config: Mapping[str, Any], net: Any, model: str, layers: Sequence[ExportLayer],
                     embedding_type: str, output_type: str, hidden: int) -> dict[str, Any]:
    """GGUF tensor name -> float32 [n] ``quant_weights`` for every tensor the plan writes in a llama.cpp type: each
    such linear must have an entry (a :class:`~quantpredict.errors.DataError` naming the file and the tensor: an
    imatrix of another model, or one missing layers, would silently quantize those without one); the token
    embedding and the output head, when quantized, take theirs if the file has one and are quantized without
    otherwise, as llama-quantize does (llama-imatrix never collects ``token_embd``, and ``output`` only with
    ``--process-output``). Float types (F16, BF16) ignore it, as ggml's quantizers do."""
    from quantpredict import arch
    from quantpredict.formats.table import GGML_TYPE_ID
    from quantpredict.imatrix import as_imatrix, tensor_weights

    im, source = as_imatrix(imatrix)
    source = f"imatrix file {source}" if isinstance(imatrix, (str, os.PathLike)) else source
    quantized = [layer for layer in layers if layer.quantized and layer.kind in GGML_TYPE_ID]
    names = gguf_tensor_names(gguf_arch_name(str(config.get("model_type", ""))), len(arch.blocks(net)),
                              [layer.name for layer in quantized], model=model)
    rows = {names[layer.name]: layer.in_features for layer in quantized}
    for role, kind in (("token_embd.weight", embedding_type), ("output.weight", output_type)):
        if kind in GGML_TYPE_ID:
            rows[role] = hidden
    return tensor_weights(im, rows, source=source, optional={"token_embd.weight", "output.weight"})


def check_converter(plan: ExportPlan, src: Path) -> None:
    """That the converter in ``src`` knows the model's architecture and that the packages it imports are here."""
    known = converter_architectures(src)
    if known and plan.hf_architecture not in known:
        raise ModelError(f"{plan.model}: llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}) has no "
                         f"architecture {plan.hf_architecture}, so llama.cpp cannot load it")
    check_converter_packages()


def gguf_names(plan: ExportPlan, arch_name: str, n_blocks: int) -> dict[str, str]:
    """``{Hugging Face linear name: GGUF tensor name}`` of the plan's layers by gguf's own name map of the
    converted file's architecture (:func:`gguf_tensor_names`)."""
    return gguf_tensor_names(arch_name, n_blocks, [layer.name for layer in plan.layers], model=plan.model)


# ---- the rewrite ------------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    return field.contents()


def _gguf_type(kind: str) -> Any:
    import gguf

    from quantpredict.formats.table import GGML_TYPE_ID

    if kind in GGML_TYPE_ID:
        return gguf.GGMLQuantizationType(GGML_TYPE_ID[kind])
    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "f32": gguf.GGMLQuantizationType.F32}[kind]


def pack(data: Any, kind: str, imatrix: Any = None) -> Any:
    """A float32 [rows, n] array in ``kind`` as GGUF stores it: ggml block bytes (uint8 [rows, row bytes]) by
    :func:`~quantpredict.formats.ggml.to_gguf_bytes` (with ``imatrix``, float32 [n] quant_weights, as
    llama-quantize --imatrix quantizes), float16, bf16 bytes, or float32 (the float types ignore ``imatrix``, as
    ggml does)."""
    import numpy as np

    if kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if kind == "f16":
        return np.ascontiguousarray(data, dtype=np.float32).astype(np.float16)
    if kind == "bf16":
        import gguf

        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
    import torch

    from quantpredict.formats.ggml_imatrix import to_gguf_bytes

    return to_gguf_bytes(torch.from_numpy(np.array(data, dtype=np.float32)), kind, imatrix=imatrix)


def rewrite(src: Path, out: Path, types: Mapping[str, str], file_type: int, *,
            progress: Callable[[int], None] | None = None,
            imatrix: Mapping[str, Any] | None = None, reader: Any = None) -> list[tuple[str, str]]:
    """Copy the F32 GGUF ``src`` to ``out`` with each tensor named in ``types`` (GGUF name -> ``q4_k``, ``f16``,
    ...) stored in that type, every other tensor and every key/value field as they were, ``general.file_type`` set
    to ``file_type`` and ``general.quantization_version`` to gguf's. Returns ``(name, type)`` of every tensor written,
    in order. ``progress`` is called with each tensor's element count as it is written. ``imatrix``: GGUF name ->
    float32 [n] quant_weights of the tensors quantized with an importance matrix (:func:`pack`); the tensor as it
    stands in ``src``, rows already moved by the converter: the weights are per column, and the converter moves
    whole rows only, so they apply unchanged. ``reader``: ``src`` already opened by ``gguf.GGUFReader`` (parsing a
    file's tokenizer fields takes seconds: its caller reads it once)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src)) if reader is None else reader
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ModelError(f"{src} has no {gguf.Keys.General.ARCHITECTURE}")
    by_name = {t.name: t for t in reader.tensors}
    missing = sorted(set(types) - set(by_name))
    if missing:
        raise ModelError(f"the converted file has no tensor {', '.join(missing[:4])}")
    writer = gguf.GGUFWriter(str(out), _field_value(arch_field), endianess=reader.endianess)
    quantized = any(_gguf_type(k) not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                                          gguf.GGMLQuantizationType.F32) for k in types.values())
    wrote_ftype = wrote_qv = False
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # GGUFWriter writes the architecture itself; GGUF.* are the header's own fields
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = _field_value(field)
        if field.name == gguf.Keys.General.FILE_TYPE:
            value, vtype, wrote_ftype = int(file_type), gguf.GGUFValueType.UINT32, True
        elif field.name == gguf.Keys.General.QUANTIZATION_VERSION:
            value, vtype, wrote_qv = gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32, True
        elif field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    if not wrote_ftype:
        writer.add_file_type(int(file_type))
    if quantized and not wrote_qv:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written = []
    for t in reader.tensors:
        kind = types.get(t.name)
        if kind is None:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            written.append((t.name, t.tensor_type.name.lower()))
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.data.shape) != 2:
            raise ModelError(f"{t.name} in the converted file is {t.tensor_type.name} of shape "
                             f"{tuple(t.data.shape)}, not a 2-D F32 tensor")
        rows, n = (int(s) for s in t.data.shape)
        raw = _gguf_type(kind)
        block, type_size = gguf.GGML_QUANT_SIZES[raw]
        if n % block:
            raise RecipeError(f"{t.name}: rows of {n} are not a multiple of {kind}'s block of {block}")
        nbytes = rows * (n // block) * type_size
        if kind in ("f16", "f32"):
            writer.add_tensor_info(t.name, (rows, n), np.dtype(np.float16 if kind == "f16" else np.float32),
                                   nbytes)
        else:
            writer.add_tensor_info(t.name, (rows, n // block * type_size), np.dtype(np.uint8), nbytes, raw)
        written.append((t.name, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        kind = types.get(t.name)
        data = t.data if kind is None else pack(t.data, kind, (imatrix or {}).get(t.name))
        writer.write_tensor_data(data, tensor_endianess=reader.endianess if kind is None else None)
        if progress is not None:
            progress(int(t.n_elements))
    writer.close()
    return written


def _check_imatrix_names(plan: ExportPlan, types: Mapping[str, str]) -> None:
    """That the plan's imatrix weights cover every linear of a llama.cpp type under its name in the converted file
    (the plan named them by the config's architecture; the converter may name another)."""
    from quantpredict.formats.table import GGML_TYPE_ID

    if not plan.imatrix_label:
        return
    missing = [n for n, k in types.items() if k in GGML_TYPE_ID and n not in plan.imatrix_weights]
    if missing:
        raise ModelError(f"the converted file names {missing[0]} a tensor that the plan's imatrix weights do not "
                         f"cover (the architecture's GGUF names differ from gguf's map of "
                         f"{plan.hf_architecture}); export this model without --imatrix")


# ---- the whole export -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    path: Path
    plan: ExportPlan
    tensors: tuple[tuple[str, str], ...]  # (GGUF name, type) in file order
    kept: tuple[str, ...]  # the token embedding / output head tensors of the file (their types: plan.role_type)
    linear_types: tuple[tuple[str, str], ...]  # (GGUF name, type) of each linear layer of the plan
    pre_tokenizer_fallback: bool
    bytes: int

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(k for _, k in self.tensors))


@contextmanager
def _work_dir(out: Path) -> Iterator[Path]:
    """A private temporary folder beside ``out`` (the same file system, so the result is renamed, not copied),
    removed on every exit; folders made for ``out`` are removed again when nothing else was put in them."""
    made = []
    parent = out.parent
    for d in reversed([parent, *parent.parents]):
        if not d.exists():
            made.append(d)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for d in reversed(made):
                try:
                    d.rmdir()
                except OSError:
                    break


def export_gguf(plan: ExportPlan, out: str | os.PathLike, *, progress: bool = True,
                status: Callable[[str], None] | None = None, download: bool = True) -> ExportResult:
    """Write the GGUF file of ``plan`` (:func:`plan_export`) to ``out``: convert, rewrite, rename when whole. Nothing
    is left behind on failure or interrupt (a file already at ``out`` stays as it was)."""
    import gguf
    from tqdm.auto import tqdm

    from quantpredict.files import honour_umask

    out = Path(out).expanduser()
    say = status or (lambda text: None)
    check_converter_packages()
    src = converter_dir(download=download)
    check_converter(plan, src)
    with _work_dir(out) as tmp:
        f32 = tmp / "model-f32.gguf"
        say(f"converting {plan.model} to an F32 GGUF with llama.cpp's convert_hf_to_gguf.py "
            f"(llama-cpp-python {LLAMA_CPP_PYTHON})")
        conv = convert(plan.model_dir, f32, "f32", src=src)
        reader = gguf.GGUFReader(str(f32))
        arch_name = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
        names = gguf_names(plan, arch_name, n_blocks)
        shapes = {t.name: tuple(int(s) for s in t.data.shape) for t in reader.tensors}
        total = sum(int(t.n_elements) for t in reader.tensors)
        types: dict[str, str] = {}
        for layer in plan.layers:
            name = names[layer.name]
            if shapes.get(name) != (layer.out_features, layer.in_features):
                raise ModelError(f"{name} is {shapes.get(name)} in the converted file, but {layer.name} is "
                                 f"[{layer.out_features}, {layer.in_features}] (rows of {layer.in_features}): "
                                 "export cannot map this architecture's weights")
            types[name] = layer.kind
        linear_types = tuple(types.items())
        _check_imatrix_names(plan, types)
        kept = tuple(n for n in KEPT_ROLES if n in shapes and len(shapes[n]) == 2)
        for n in kept:
            types[n] = plan.role_type(n)
        ftype = getattr(gguf.LlamaFileType, plan.file_type)
        part = tmp / out.name
        with tqdm(total=total, desc=f"export {plan.llama_quantize_type}", unit="param", unit_scale=True,
                  disable=not progress) as bar:
            written = rewrite(f32, part, types, int(ftype), progress=bar.update, imatrix=plan.imatrix_weights,
                              reader=reader)
        del reader  # its mapping of the F32 file
        f32.unlink()
        honour_umask(part)
        os.replace(part, out)
    return ExportResult(out, plan, tuple(written), kept, linear_types, conv.pre_tokenizer_fallback,
                        out.stat().st_size)


# ---- llama-quantize's equivalent ------------------------------------------------------------------------------------


_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def tensor_type_patterns(types: Mapping[str, str]) -> list[str]:
    """``--tensor-type PATTERN=TYPE`` values giving each tensor of ``types`` (GGUF name -> type) its type in
    llama-quantize, which matches each pattern as a regular expression: anchored, one per (role, type), the layers
    listed (``^blk\\.(0|5)\\.ffn_down\\.weight$=q6_k``; ``[0-9]+`` where every layer has that type)."""
    groups: dict[tuple[str, str], list[int]] = {}
    layers_of: dict[str, set[int]] = {}
    plain = []
    for name, kind in types.items():
        m = _BLOCK_NAME.fullmatch(name)
        if m:
            groups.setdefault((m.group(2), kind), []).append(int(m.group(1)))
            layers_of.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            plain.append(f"^{re.escape(name)}$={kind}")
    out = []
    for (role, kind), ids in groups.items():
        ids = sorted(ids)
        if set(ids) == layers_of[role]:
            which = "[0-9]+"
        else:
            which = str(ids[0]) if len(ids) == 1 else "(" + "|".join(map(str, ids)) + ")"
        out.append(f"^blk\\.{which}\\.{re.escape(role)}$={kind}")
    return out + plain


def llama_quantize_command(result: ExportResult, *, src: str = "MODEL-f32.gguf", out: str | None = None) -> str:
    """The llama-quantize command that gives every tensor the type it has in ``result``, from the F32 file of the
    same converter (``convert_hf_to_gguf.py MODEL --outtype f32``): the token embedding and output head kept in the
    keep type, each linear layer named by an anchored ``--tensor-type`` pattern, the file type of ``result``; with
    the plan's imatrix, ``--imatrix FILE``."""
    args = ["llama-quantize"]
    if result.plan.imatrix_file:
        args += ["--imatrix", result.plan.imatrix_file]
    if "token_embd.weight" in result.kept:
        args += ["--token-embedding-type", result.plan.role_type("token_embd.weight")]
    if "output.weight" in result.kept:
        args += ["--output-tensor-type", result.plan.role_type("output.weight")]
    for pattern in tensor_type_patterns(dict(result.linear_types)):
        args += ["--tensor-type", pattern]
    return shlex.join([*args, src, out or str(result.path), result.plan.llama_quantize_type])
