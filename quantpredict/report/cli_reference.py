"""README's CLI reference, generated from the parser itself so it cannot drift from the code.

``python -m quantpredict.cli.reference`` writes ``docs/cli.md`` (every command and sub-command: usage,
description, options) and, when README.md holds the markers ``<!-- cli-reference -->`` and
``<!-- /cli-reference -->``, replaces what is between them with the compact form (one table of commands and their
one-line help, each linking to its section of docs/cli.md). ``--check`` writes nothing and exits 1 when either file
is stale.

The text is built from the parser's actions (option strings, metavars, help), not from argparse's formatted help,
so it reads the same on every Python version and terminal width. Every function takes the parser: this module
sits in ``report``, below the CLI, and never imports it (:mod:`quantpredict.cli.reference` passes
``quantpredict.cli.build_parser()`` and is the command that writes the files).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS_PATH = ROOT / "docs" / "cli.md"
README_PATH = ROOT / "README.md"
BEGIN, END = "<!-- cli-reference -->", "<!-- /cli-reference -->"
REGENERATE = "python -m quantpredict.cli.reference"


@dataclass(frozen=True)
class Command:
    """One (sub-)command: its words after ``quantpredict``, its parser and its one-line help."""

    words: tuple[str, ...]
    parser: argparse.ArgumentParser
    help: str

    @property
    def name(self) -> str:
        return " ".join(("quantpredict", *self.words))


def _require(parser: argparse.ArgumentParser | None) -> argparse.ArgumentParser:
    if parser is None:
        raise TypeError("pass the parser, e.g. quantpredict.cli.build_parser(); the report layer does not import the "
                        "CLI (see quantpredict.cli.reference)")
    return parser


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = (), help_: str = "") -> Iterator[Command]:
    """Every command under ``parser`` (itself first), depth first, in the order they were added."""
    yield Command(words, parser, help_)
    sub = _subparsers(parser)
    if sub is None:
        return
    helps = {a.dest: _clean(a.help) for a in sub._choices_actions}
    for name, child in sub.choices.items():
        yield from commands(child, (*words, name), helps.get(name, ""))


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        mv = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        mv = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        mv = action.dest if not action.option_strings else action.dest.upper()
    n = action.nargs
    if n is None:
        return mv
    if n == "?":
        return f"[{mv}]"
    if n == "*":
        return f"[{mv} ...]"
    if n == "+":
        return f"{mv} [{mv} ...]"
    if isinstance(n, int):
        return " ".join([mv] * n)
    return mv


def _invocation(action: argparse.Action, *, all_flags: bool) -> str:
    mv = _metavar(action)
    if not action.option_strings:
        return mv
    flags = action.option_strings if all_flags else [max(action.option_strings, key=len)]
    return ", ".join(f"{f} {mv}".strip() for f in flags)


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            and not isinstance(a, argparse._SubParsersAction)]


def usage(cmd: Command) -> str:
    """A one-line usage: ``quantpredict report (--store STORE | --runs RUNS) [--out OUT] ...``."""
    parser = cmd.parser
    groups = {}
    for g in parser._mutually_exclusive_groups:
        for a in g._group_actions:
            groups[id(a)] = g
    parts, done = [], set()
    for a in _visible(parser):
        g = groups.get(id(a))
        if g is not None:
            if id(g) in done:
                continue
            done.add(id(g))
            inner = " | ".join(_invocation(x, all_flags=False) for x in g._group_actions if x.help != argparse.SUPPRESS)
            parts.append(f"({inner})" if g.required else f"[{inner}]")
        elif a.option_strings and not a.required:
            parts.append(f"[{_invocation(a, all_flags=False)}]")
        else:
            parts.append(_invocation(a, all_flags=False))
    sub = _subparsers(parser)
    if sub is not None:
        parts.append((sub.metavar or "{" + ",".join(sub.choices) + "}") + " ...")
    return " ".join([cmd.name, *parts])


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        params = dict(vars(action), prog=prog)
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    text = _clean(text)
    d = action.default
    if (action.option_strings and action.nargs != 0 and d is not None and d != argparse.SUPPRESS
            and "default" not in text.lower()):
        text += f" (default: `{d}`)"
    if action.required and action.option_strings:
        text = "**required.** " + text
    return text.replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The full reference (docs/cli.md): a table of commands, then one section per command."""
    parser = _require(parser)
    cmds = list(commands(parser))
    lines = ["# quantpredict command-line reference", "",
             f"Generated from `quantpredict.cli.build_parser()` by `{REGENERATE}`; do not edit by hand "
             "(the test suite fails when this file is stale).", "",
             _clean(parser.description), "", "| command | what it does |", "|---|---|"]
    lines += [f"| [`{c.name}`](#{_anchor(c.name)}) | {_cell(c.help)} |" for c in cmds[1:]]
    lines.append("")
    for c in cmds:
        level = "#" * min(2 + max(len(c.words) - 1, 0), 4)
        lines += [f"{level} {c.name}", ""]
        desc = _clean(c.parser.description) or c.help
        if desc and c.words:
            lines += [desc, ""]
        lines += ["```", usage(c), "```", ""]
        sub = _subparsers(c.parser)
        if sub is not None:
            lines += ["| sub-command | what it does |", "|---|---|"]
            lines += [f"| `{name}` | {_cell(_clean(a.help))} |" for name, a in
                      ((a.dest, a) for a in sub._choices_actions)]
            lines.append("")
        acts = _visible(c.parser)
        if acts:
            lines += ["| argument | description |", "|---|---|"]
            lines += [f"| `{_invocation(a, all_flags=True)}` | {_help(a, c.name)} |" for a in acts]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation other than - and _ dropped."""
    return "".join(ch for ch in title.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")


def summary(parser: argparse.ArgumentParser | None = None, docs_link: str = "docs/cli.md") -> str:
    """The compact form for README's marked block: every leaf command and its one-line help, each linked to its
    section of ``docs_link``. Usage lines and options stay in docs/cli.md only: README is the newcomer's page."""
    parser = _require(parser)
    cmds = [c for c in commands(parser) if c.words and _subparsers(c.parser) is None]
    lines = [f"<!-- generated by `{REGENERATE}` from the parser; do not edit by hand -->", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{c.name}`]({docs_link}#{_anchor(c.name)}) | {_cell(c.help)} |" for c in cmds]
    lines += ["", f"Usage and every option of every command: [{docs_link}]({docs_link}).", ""]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str | None:
    """``text`` with what lies between the markers replaced by ``block``; None when the markers are absent."""
    start = text.find(BEGIN)
    end = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[: start + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def outputs(docs: Path = DOCS_PATH, readme: Path | None = README_PATH,
            parser: argparse.ArgumentParser | None = None) -> dict[Path, str]:
    """``{path: expected text}``: docs/cli.md, and README.md when it has the markers."""
    parser = _require(parser)
    out = {Path(docs): reference(parser)}
    if readme is not None and Path(readme).is_file():
        new = replace_block(Path(readme).read_text(), summary(parser))
        if new is not None:
            out[Path(readme)] = new
    return out


def stale(docs: Path = DOCS_PATH, readme: Path | None = README_PATH,
          parser: argparse.ArgumentParser | None = None) -> list[Path]:
    """The files whose text differs from what the parser generates (missing ones included)."""
    return [p for p, text in outputs(docs, readme, parser).items()
            if not p.is_file() or p.read_text() != text]
