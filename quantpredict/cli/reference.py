"""``python -m quantpredict.cli.reference [--check]``: write docs/cli.md and README.md's CLI block from the parser.

The text itself is :mod:`quantpredict.report.cli_reference`'s; this module hands it the real parser (the report
layer never imports the CLI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from quantpredict.cli import build_parser
from quantpredict.report.cli_reference import DOCS_PATH, README_PATH, REGENERATE, outputs, stale


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'quantpredict.cli.reference'}",
                                 description="Write docs/cli.md and README.md's CLI block from the parser.")
    ap.add_argument("--docs", type=Path, default=DOCS_PATH, help="full reference path (default: docs/cli.md)")
    ap.add_argument("--readme", type=Path, default=README_PATH,
                    help="README whose marked block is replaced (default: README.md; skipped without the markers)")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = ap.parse_args(argv)
    parser = build_parser()
    readme = None if args.no_readme else args.readme
    if args.check:
        bad = stale(args.docs, readme, parser)
        for p in bad:
            print(f"stale: {p} (regenerate with `{REGENERATE}`)", file=sys.stderr)
        return 1 if bad else 0
    for path, text in outputs(args.docs, readme, parser).items():
        if path.is_file() and path.read_text() == text:
            print(f"unchanged {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
