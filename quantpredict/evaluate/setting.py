"""The evaluation setting as :func:`~quantpredict.evaluate.compare` and :func:`~quantpredict.evaluate.perplexity`
take it: one :class:`~quantpredict.recipe.EvalSetting` (what a run key names), or its fields as keywords.

:class:`EvalSetting` lives in the torch-free :mod:`quantpredict.recipe`, below this package, so that run planning
builds it without torch and the evaluation takes the very same object: a sweep hands each run's setting to
:func:`compare` unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quantpredict.errors import DataError
from quantpredict.recipe import EvalSetting

#: The :class:`EvalSetting` fields :func:`compare` and :func:`perplexity` also take as keywords
#: (``compare(fp, q, tok, max_windows=64)`` is ``compare(fp, q, tok, EvalSetting(max_windows=64))``, except that
#: without ``bos`` the tokenizer's protocol decides).
SETTING_KEYWORDS = ("seq_len", "max_windows", "bos")


@dataclass(frozen=True)
class Windowing:
    """What an evaluation reads off its setting: window length, how many windows, BOS (``None``: the tokenizer's
    protocol decides), the user's text (its sha256 prefix, and the file it is read from)."""

    seq_len: int = 256
    max_windows: int | None = None
    bos: bool | None = None
    text_sha: str | None = None
    text_file: Any = None


def windowing(evaluation: EvalSetting | None, fields: Mapping[str, Any], *, fn: str,
              allowed: tuple[str, ...] = SETTING_KEYWORDS, text: Any = None) -> Windowing:
    """``evaluation`` with ``fields`` (keywords naming its fields) replaced, as a :class:`Windowing`.

    Without ``evaluation`` the keywords are taken as given (the windowing checks them, as it always did); with one
    they replace its fields (``dataclasses.replace``, so they are checked as the setting checks them). ``text`` (a
    file path) overrides the setting's ``text_file``. An unknown keyword is a ``TypeError`` naming ``fn``."""
    unknown = [k for k in fields if k not in allowed]
    if unknown:
        raise TypeError(f"{fn}() got an unexpected keyword argument {unknown[0]!r}")
    if evaluation is None:
        return Windowing(fields.get("seq_len", 256), fields.get("max_windows"), fields.get("bos"), None, text)
    if not isinstance(evaluation, EvalSetting):
        raise TypeError(f"{fn}(): evaluation must be an EvalSetting, got {type(evaluation).__name__}")
    ev = dataclasses.replace(evaluation, **fields) if fields else evaluation
    return Windowing(ev.seq_len, ev.max_windows, ev.bos, ev.text, text if text is not None else ev.text_file)


def check_text(w: Windowing, stream=None) -> None:
    """A setting that names a user's text (``text_sha``) needs its file, and the file must still hash to it. Called
    before tokenizing (no stream: the file must be given) and after (the stream's sha256 prefix, computed once while
    reading it, must match)."""
    if w.text_sha is None:
        return
    if stream is None:
        if w.text_file is None:
            raise DataError(f"the evaluation setting names a user's text (sha256 {w.text_sha}) but no text file was "
                            "given; pass text=PATH or EvalSetting.with_text_file(PATH)")
        return
    if stream.text_sha != w.text_sha:
        raise DataError(f"the evaluation text {w.text_file} hashes to {stream.text_sha}, but the evaluation setting "
                        f"was made for the text {w.text_sha}; plan it again with this file")
