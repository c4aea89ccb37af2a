"""``quantpredict export MODEL --recipe R --gguf OUT.gguf``: the model under an RTN recipe of llama.cpp types, as a
GGUF file llama.cpp loads (:mod:`quantpredict.export`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from quantpredict.cli import options


def register(subparsers) -> None:
    from quantpredict.export import KEEP_TYPES, LLAMA_CPP_PYTHON

    p = subparsers.add_parser(
        "export",
        help="write a model under an RTN recipe of llama.cpp types as a GGUF file llama.cpp loads",
        description="Write MODEL quantized by R as a GGUF file: llama.cpp's own converter (convert_hf_to_gguf.py of "
                    f"llama-cpp-python {LLAMA_CPP_PYTHON}, fetched with pip into $QUANTPREDICT_HOME/llama_cpp the "
                    "first time) writes the metadata, tokenizer and float32 weights, and each weight the recipe "
                    "quantizes is replaced by its llama.cpp blocks, bit-exact with llama.cpp's reference quantizer. "
                    "R is a named mix (q4_k_m, q5_k_m, q3_k_m, iq4_xs_mix ...), a uniform recipe of one llama.cpp "
                    "type (q8_0-rtn, q4_k-rtn ...) or a per-layer recipe of llama.cpp types (a label, or the JSON "
                    "`quantpredict allocate --out` writes, with --recipe-file); RTN only. The token embedding and "
                    "the output head are written in --keep-type (F16), unless --embedding-type/--output-type or the "
                    "recipe's own E=/H= types name theirs: a named mix with the file option (q4_k_m-file) gives both "
                    "the types llama-quantize's own file has. Prints the llama-quantize command "
                    "that gives every tensor the same type, for quantizing with llama.cpp's own tools. Needs the "
                    "export extra: pip install 'quantpredict[export]' (gguf, and the sentencepiece the converter "
                    "imports).",
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or local Hugging Face model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", metavar="R",
                      help="a named mix (q4_k_m) or a recipe label of llama.cpp types (q8_0-rtn, a per-layer L=...)")
    what.add_argument("--recipe-file", metavar="FILE",
                      help="the recipe in a file: the JSON `quantpredict allocate --out` writes, a recipe's JSON "
                           "fields, or one label")
    p.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write")
    p.add_argument("--keep-type", choices=KEEP_TYPES, default="f16",
                   help="type of the tensors the recipe leaves unquantized: token embedding, output head, skipped "
                        "layers (default f16)")
    p.add_argument("--embedding-type", metavar="TYPE", default=None,
                   help="write the token embedding in this llama.cpp type (q8_0, q6_k, ...; llama-quantize's "
                        "--token-embedding-type) instead of --keep-type; on a tied model it is the head too")
    p.add_argument("--output-type", metavar="TYPE", default=None,
                   help="write the output head in this llama.cpp type (llama-quantize's --output-tensor-type; "
                        "untied models) instead of --keep-type")
    options.add_imatrix(p, "quantize every tensor of a llama.cpp type with it (each linear must have an entry; the "
                           "token embedding and output head take theirs if the file has one)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new file is whole)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    options.add_threads(p)
    p.set_defaults(func=run)


def recipe_from_file(path_text: str) -> Any:
    """The one recipe in ``--recipe-file``: a label or a dict of fields (``allocate --out``'s ``recipe_fields``)."""
    from pathlib import Path

    from quantpredict.errors import RecipeError

    path = Path(path_text)
    if not path.is_file():
        raise RecipeError(f"--recipe-file {path} does not exist; pass the JSON `quantpredict allocate --out` wrote "
                          "or a file holding one recipe label")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"--recipe-file {path} cannot be read: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        items: list[Any] = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    else:
        if isinstance(doc, dict):
            items = [doc.get("recipe_fields") or doc.get("recipe") or doc] if "weight_format" not in doc else [doc]
        elif isinstance(doc, list):
            items = doc
        else:
            items = [doc]
    if len(items) != 1 or not isinstance(items[0], (str, dict)):
        raise RecipeError(f"--recipe-file {path} holds {len(items)} recipes; export writes one model: give a file "
                          "of one recipe")
    return items[0]


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import OutputError
    from quantpredict.export import KEEP_TYPES, export_gguf, llama_quantize_command, plan_export, source_dir

    spec = args.recipe.strip() if args.recipe is not None else recipe_from_file(args.recipe_file)
    model_dir = options.check_model(args.model)  # every input and output checked before any work
    out = options.check_out(args.gguf, "--gguf")
    if out.exists() and not args.force:
        raise OutputError(f"--gguf {args.gguf} exists; pass --force to replace it, or another path")
    if out.resolve().is_relative_to(model_dir.resolve()):
        raise OutputError(f"--gguf {args.gguf} is inside the model's folder {model_dir}; write it elsewhere")
    plan = plan_export(args.model, spec, keep=args.keep_type, embedding_type=args.embedding_type,
                       output_type=args.output_type, imatrix=args.imatrix)  # from the config and the imatrix

    def status(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = export_gguf(plan, out, progress=not args.no_progress, status=status)
    command = llama_quantize_command(result, src=f"{plan.model_dir.name}-f32.gguf", out=str(out))
    convert = (f"python {source_dir() / 'convert_hf_to_gguf.py'} {plan.model_dir} --outtype f32 "
               f"--outfile {plan.model_dir.name}-f32.gguf")
    if args.json:
        print(json.dumps({"path": str(result.path), "bytes": result.bytes, "model": plan.model,
                          "recipe": plan.recipe_label, "mix": plan.mix, "file_type": plan.file_type,
                          "keep_type": plan.keep, "kept": list(result.kept),
                          "kept_types": {n: plan.role_type(n) for n in result.kept},
                          "tensors": [{"name": n, "type": k} for n, k in result.tensors],
                          "pre_tokenizer_fallback": result.pre_tokenizer_fallback,
                          "imatrix": plan.imatrix_label,
                          "imatrix_tensors": sorted(plan.imatrix_weights),
                          "llama_cpp_convert": convert, "llama_quantize": command}, indent=2))
        return 0
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.type_counts().items(), key=lambda kv: -kv[1]))
    shown = plan.mix or (plan.recipe_label if len(plan.recipe_label) <= 60 else plan.recipe_label[:57] + "...")
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): {plan.model} under {shown}, file type "
          f"{plan.llama_quantize_type}")
    print(f"  tensors: {counts}")
    if plan.imatrix_label:
        without = [n for n in ("token_embd.weight", "output.weight")
                   if n in result.kept and plan.role_type(n) not in KEEP_TYPES and n not in plan.imatrix_weights]
        print(f"  imatrix {plan.imatrix_label}: {len(plan.imatrix_weights)} tensors quantized with it"
              + (f"; {', '.join(without)} without (no entry in the file, as llama-quantize does)" if without else ""))
    by_type: dict[str, list[str]] = {}
    for n in result.kept:
        by_type.setdefault(plan.role_type(n), []).append(n)
    for kind, names in by_type.items():
        if kind in KEEP_TYPES:
            print(f"  kept in {kind.upper()}: {', '.join(names)} (the project's recipes do not quantize the token "
                  "embedding or the output head; llama-quantize's own mixes would)")
        else:
            print(f"  {', '.join(names)} in {kind.upper()}, as asked (the project's recipes and predictions leave "
                  "them in 16 bits)")
    if args.output_type and "output.weight" not in result.kept:
        print("  note: the file has no output.weight (the head is the token embedding), so --output-type had "
              "nothing to apply to; --embedding-type sets both")
    if result.pre_tokenizer_fallback:
        print("  note: llama.cpp's converter does not know this tokenizer by its hash; its pre-tokenizer is GPT-2's "
              "byte-level one and is written as tokenizer.ggml.pre = gpt-2")
    print("the same types with llama.cpp's own tools (from an F32 conversion; bit-identical where llama.cpp is built "
          "without FMA contraction, -ffp-contract=off):")
    print(f"  {convert}")
    print(f"  {command}")
    return 0
