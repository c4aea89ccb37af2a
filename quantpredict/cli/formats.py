"""`quantpredict formats`: every number format with its element and bits per element (scales, zero points,
sub-block and second-level scales included)."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("formats", help="list every number format with its bits per element")
    p.add_argument("--block-size", type=int, default=128,
                   help="also show bits per element with this block (group) size for MX/int/fp8/uint/nf4 "
                        "(default 128)")
    p.add_argument("--row-length", type=int, default=4096,
                   help="row length over which a per-channel scale is spread (default 4096)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1000 and v != int(v) else f"{v:g}"
    return str(v)


def run(args: argparse.Namespace) -> int:
    from quantpredict.errors import FormatError
    from quantpredict.formats.table import format_rows

    if args.block_size < 1 or args.row_length < 1:
        raise FormatError("--block-size and --row-length must be positive integers")
    rows = format_rows(block_size=args.block_size, row_length=args.row_length)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(f"\nper-channel scales are spread over rows of {args.row_length} elements; MX scales are E8M0 (8 bits), "
          "int/fp8 scales fp16 (16 bits).\nuintK: fp16 scale + k-bit zero point per group (uintK_pc: per channel); "
          "nf4: fp32 absmax per block, nf4_dq: 8-bit absmax per block + fp32 per 256 blocks;\n"
          "q8_0/q5_*/q4_*/q*_k/iq4_*: llama.cpp's block layouts (their block is fixed: '-' at other block sizes; rows "
          "must be a multiple of it).")
    return 0
