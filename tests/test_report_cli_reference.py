"""The generated CLI reference: exact text for a toy parser, README's marked block, and docs/cli.md kept current."""

from __future__ import annotations

import argparse

from quantpredict.report import cli_reference as ref


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantpredict", description="Toy tool.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser("alpha", help="first | command", description="The first\n   command.")
    a.add_argument("model", help="a model")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--store", help="a store")
    g.add_argument("--runs", help="runs")
    a.add_argument("--kinds", nargs="+", default=["ols"], help="kinds (default: %(default)s)")
    a.add_argument("-n", "--n-trees", type=int, default=50, help="trees")
    a.add_argument("--mode", choices=("x", "y"), help="a mode")
    a.add_argument("--out", required=True, metavar="DIR", help="where")
    a.add_argument("--hidden", help=argparse.SUPPRESS)
    b = sub.add_parser("beta", help="grouped")
    bsub = b.add_subparsers(dest="beta_command", metavar="ACTION", required=True)
    bsub.add_parser("show", help="show it")
    return p


def test_usage_lines_and_walk():
    cmds = list(ref.commands(toy_parser()))
    assert [c.name for c in cmds] == ["quantpredict", "quantpredict alpha", "quantpredict beta",
                                      "quantpredict beta show"]
    assert ref.usage(cmds[0]) == "quantpredict [--debug] COMMAND ..."
    assert ref.usage(cmds[1]) == ("quantpredict alpha model (--store STORE | --runs RUNS) [--kinds KINDS [KINDS ...]] "
                                  "[--n-trees N_TREES] [--mode {x,y}] --out DIR")
    assert ref.usage(cmds[2]) == "quantpredict beta ACTION ..."
    assert cmds[3].help == "show it"


def test_reference_sections_and_tables():
    text = ref.reference(toy_parser())
    assert text.startswith("# quantpredict command-line reference\n")
    assert "| [`quantpredict alpha`](#quantpredict-alpha) | first \\| command |" in text
    assert "## quantpredict alpha\n\nThe first command.\n" in text  # whitespace of descriptions collapsed
    assert "### quantpredict beta show" in text
    assert "| `--kinds KINDS [KINDS ...]` | kinds (default: ['ols']) |" in text  # %(default)s expanded, once
    assert "| `-n N_TREES, --n-trees N_TREES` | trees (default: `50`) |" in text
    assert "| `--out DIR` | **required.** where |" in text
    assert "| `model` | a model |" in text
    assert "--hidden" not in text and "-h, --help" not in text
    assert text == ref.reference(toy_parser())  # deterministic


def test_readme_block_replacement():
    block = ref.summary(toy_parser())
    assert "| [`quantpredict beta show`](docs/cli.md#quantpredict-beta-show) | show it |" in block
    assert "quantpredict alpha model (--store STORE | --runs RUNS)" not in block  # usage lines: docs/cli.md only
    assert "quantpredict alpha model (--store STORE | --runs RUNS)" in ref.reference(toy_parser())
    text = f"intro\n{ref.BEGIN}\nold stuff\n{ref.END}\noutro\n"
    new = ref.replace_block(text, block)
    assert new.startswith(f"intro\n{ref.BEGIN}\n") and new.endswith(f"{ref.END}\noutro\n")
    assert "old stuff" not in new and block.strip() in new
    assert ref.replace_block(new, block) == new  # idempotent
    assert ref.replace_block("no markers here", block) is None


def test_write_and_check(tmp_path, capsys):
    docs, readme = tmp_path / "docs" / "cli.md", tmp_path / "README.md"
    readme.write_text(f"# x\n{ref.BEGIN}\n{ref.END}\n")
    assert ref.stale(docs, readme, toy_parser()) == [docs, readme]
    for path, text in ref.outputs(docs, readme, toy_parser()).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert ref.stale(docs, readme, toy_parser()) == []
    readme.write_text("# no markers\n")
    assert list(ref.outputs(docs, readme, toy_parser())) == [docs]  # README without markers is left alone


def test_docs_cli_md_is_current():
    """docs/cli.md (and README's marked block) match the real parser: regenerate with
    `python -m quantpredict.cli.reference` after changing any command's arguments or help."""
    from quantpredict.cli import build_parser

    stale = ref.stale(parser=build_parser())
    assert not stale, (f"stale CLI reference: {[str(p) for p in stale]}; run `{ref.REGENERATE}` and commit the "
                       "result")
