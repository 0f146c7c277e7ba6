"""LaTeX answer string -> sympy object, through math-verify 0.9.0's normaliser and latex2sympy2_extended.

What is added on top of them:
- unicode math (−, ×, ÷, π, √, ≤, ≥, ≠, ∞, full-width digits) is mapped to LaTeX first;
- scientific notation `2e-20`, `1.5E+3` is read as a number (latex2sympy reads `2e-20` as `2*E - 20`);
- math-verify's plain-expression extractor calls sympy's `parse_expr`, which runs Python `eval` on its input;
  `no_eval_expr_parser()` swaps it for the LaTeX grammar (ANTLR, no eval) while it is active.
Nothing here evaluates a model's text as code. Slow or huge inputs (`9^{9^{9}}`) are not guarded here: the
caller runs this in a worker process that is killed at its time limit.
"""

from __future__ import annotations

import contextlib
import functools
import re
import unicodedata
from typing import NamedTuple

__all__ = ["ParsedAnswer", "parse_answer", "no_eval_expr_parser", "latex_from_match"]

_UNICODE_TO_LATEX = {
    "\u2212": "-",
    "\u2013": "-",
    "\u00d7": r"\times ",
    "\u00f7": r"\div ",
    "\u22c5": r"\cdot ",
    "\u03c0": r"\pi ",
    "\u221a": r"\sqrt ",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2260": r"\neq ",
    "\u221e": r"\infty ",
    "\u00b0": r"^\circ ",
    "\u00a0": " ",
}
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)\s*[eE]\s*([+-]?\d+)(?![\w.])")
# Commands that would only make latex2sympy slow or confused and carry no value in an answer.
_SPACING_RE = re.compile(r"\\[,;:!]|\\quad|\\qquad")


class ParsedAnswer(NamedTuple):
    """A parsed answer: `expr` is a sympy object (None when the grammar rejects it), `text` the normalised
    LaTeX used for string comparison when parsing fails."""

    expr: object
    text: str


def _pre_normalize(answer: str) -> str:
    s = unicodedata.normalize("NFKC", answer)
    s = "".join(_UNICODE_TO_LATEX.get(c, c) for c in s)
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r"\\(?:mathrm|rm|mathit|mathnormal)\s*\{\s*([a-zA-Z])\s*\}", r"\1", s)  # see math_answer
    # "1,\! 000" is a thousands separator; every other spacing command is just space.
    s = re.sub(r"(?<=\d),\\!\s*(?=\d)", "", s)
    s = _SPACING_RE.sub(" ", s)
    s = _SCI_RE.sub(lambda m: f"{m.group(1)}\\times 10^{{{m.group(2)}}}", s)
    return s.strip()


def _latex2sympy(latex: str):
    from latex2sympy2_extended.latex2sympy2 import latex2sympy
    from math_verify.grader import should_treat_as_complex

    return latex2sympy(
        latex, is_real=not should_treat_as_complex(latex), convert_degrees=False, normalization_config=None
    )


@functools.lru_cache(maxsize=4096)  # a gold answer is parsed once per group of K samples, not K times
def parse_answer(answer: str) -> ParsedAnswer:
    """Parse one extracted answer (a LaTeX string, no `$`/`\\boxed`) into a sympy object.

    Follows math-verify's `extract_latex` (its normaliser, then latex2sympy, then the last side of an
    equation chain if the whole does not parse), after the additions listed in the module docstring.
    """
    from latex2sympy2_extended.latex2sympy2 import normalize_latex
    from math_verify.parser import LatexExtractionConfig, get_last_eq

    text = normalize_latex(_pre_normalize(answer), config=LatexExtractionConfig().normalization_config)
    try:
        return ParsedAnswer(_latex2sympy(text), text)
    except Exception:
        pass
    last = get_last_eq(text)
    if last != text:
        try:
            return ParsedAnswer(_latex2sympy(last), text)
        except Exception:
            pass
    return ParsedAnswer(None, text)


def _expr_to_sympy(expr: str):
    # math-verify hands us a string of digits, spaces and + - * / ^ ( ) × ÷ with ^ already turned into **.
    latex = (
        expr.strip()
        .rstrip(".")
        .replace("**", "^")
        .replace("*", r"\cdot ")
        .replace("×", r"\times ")
        .replace("÷", r"\div ")
    )
    return _latex2sympy(latex)


@contextlib.contextmanager
def no_eval_expr_parser():
    """While active, math-verify's plain-expression extractor parses with the LaTeX grammar, not `eval`."""
    import math_verify.parser as mv_parser

    saved = mv_parser.parse_expr_cached
    mv_parser.parse_expr_cached = _expr_to_sympy
    try:
        yield
    finally:
        mv_parser.parse_expr_cached = saved


def latex_from_match(found: list) -> str | None:
    """The answer string from math-verify's `extract_target_from_pred` output ([sympy, str] or [str] or [])."""
    from math_verify.grader import get_pct_val

    strings = [f for f in found if isinstance(f, str) and f.strip()]
    if not strings:
        return None
    text = strings[0]
    # A percent sign outside the math environment ("$28$ %") is kept only on the sympy object.
    exprs = [f for f in found if not isinstance(f, str)]
    if exprs and get_pct_val(exprs[0]) is not None and "%" not in text:
        text += r"\%"
    return text
