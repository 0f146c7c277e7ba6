"""Equivalence of two math answers: math-verify 0.9.0's comparison with its number rules made strict.

math-verify's structural comparison (sets, tuples, intervals, matrices, equations and inequalities, `x=3`
vs `3`, `\\text{}` vs symbols) is reused as is. Its numeric rule is replaced, because it rounds to a fixed
number of decimals and chops tiny values to zero, which accepts `1e-20` for `2e-20` and `1/2004!` for
`1/2006!`. The rules here:

- exact vs exact (integers, fractions, radicals, pi, factorials): equal only if exactly equal (rationals), or
  if their difference evaluates to zero at 30 significant digits with sympy's adaptive-precision evalf
  (which resolves differences as small as 1e-5749 instead of chopping them).
- a decimal on either side: relative tolerance 1e-4, `|a - b| <= 1e-4 * max(|a|, |b|)` (so 0 matches only 0).
  Also accepted: a decimal prediction that is the exact gold value correctly rounded at the prediction's own
  last digit, when the prediction has at least 3 significant digits (`0.333` for 1/3, `2.6667` for 8/3;
  not `0.3` for 1/3 nor `1.4` for sqrt(2)): a model cannot be asked for more digits than it was asked to give,
  but too few digits would reward vague approximations.
- percent: `x%` is the value x/100, and the percent sign may also be dropped: with a percent sign on exactly
  one side, the numbers as written are compared too. So gold `28%` accepts `28%`, `28`, `0.28`; gold `28`
  accepts `28` and `28%`; gold `0.28` accepts `0.28`, `28%` and (as written) `0.28%`. Bare numbers are
  never rescaled: `0.28` and `2800` do not match `28`, and `0.28%` and `2800%` do not match `28%`.
- hedges: a prediction that offers several candidates ("2 or 3", two different boxes, `\\pm 2`) is a set or
  list and only matches a gold with the same elements. On top of that, a prediction containing either,
  maybe, possibly, perhaps or probably is rejected unless the gold has the same word, and one containing
  "or" is rejected unless the gold is itself a list (has a comma, semicolon, and/or, \\pm or \\cup).
- multiple choice: a gold that is a single letter A-E matches only a prediction that is the same letter.
- a false numeric equation (`2 = 3`, `x = 2 = 3`) is wrong, whatever its last side is.
"""

from __future__ import annotations

import contextlib
import functools
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation

from fastprime.trainer.verifiers.math_answer import choice_letter
from fastprime.trainer.verifiers.math_parse import parse_answer

__all__ = ["answers_equal", "score_math", "REL_TOL", "MIN_ROUNDED_SIG_DIGITS"]

REL_TOL = 1e-4
MIN_ROUNDED_SIG_DIGITS = 3
MAX_ANSWER_CHARS = 2000
MAX_NESTING = 50
_HEDGE_RE = re.compile(r"(?<![a-z\\])(either|maybe|possibly|perhaps|probably)(?![a-z])")
_OR_RE = re.compile(r"(?<![a-z\\])or(?![a-z])")
# An approximation between two numbers is a claim that can be false (`2 \approx 3`); the parser drops the
# relation and keeps one side, so it is checked here.
_APPROX_RE = re.compile(r"\\(?:approx|thickapprox|simeq)(?![a-zA-Z])")
# A gold with any of these is a list of values, where "or" in a prediction just joins the listed values.
_LIST_MARK_RE = re.compile(r",|;|(?<![a-z])(?:and|or)(?![a-z])|\\[mp][pm]|\\cup")
# Plain integers (most wrong answers of arithmetic tasks) are compared as integers: the same verdict as the
# parser's exact rule, without its ~10 ms of LaTeX parsing per answer.
_INTEGER_RE = re.compile(r"-?[0-9]+")


def _has_float(x) -> bool:
    from sympy import Float

    return isinstance(x, Float) or (hasattr(x, "has") and x.has(Float))


def _is_zero_number(d) -> bool:
    """True if the closed-form number `d` evaluates to zero (evalf finds no nonzero digit)."""
    from sympy import Float

    v = d.evalf(30)
    parts = v.as_real_imag()
    return all(p == 0 or (isinstance(p, Float) and p._prec <= 1) for p in parts)


def _significant_digits(text: str) -> int:
    digits = text.lstrip("+-").replace(".", "").lstrip("0")
    return len(digits)


def _rounds_to(gold, pred) -> bool:
    """Is the decimal `pred` (a sympy Float) the exact `gold` rounded at pred's last written digit?"""
    from sympy import Float

    if not isinstance(pred, Float) or _has_float(gold):
        return False
    # sympy prints a Float with trailing zeros to its full precision; the written digits are what is left.
    ptext = format(Decimal(str(pred)).normalize(), "f")
    sig = _significant_digits(ptext)
    if sig < MIN_ROUNDED_SIG_DIGITS:
        return False
    try:
        pd = Decimal(ptext)
        gd = Decimal(str(gold.evalf(sig + 20)))
        quantum = Decimal(1).scaleb(pd.as_tuple().exponent)
        return any(gd.quantize(quantum, rounding=r) == pd for r in (ROUND_HALF_UP, ROUND_HALF_EVEN))
    except (InvalidOperation, ValueError, TypeError):
        return False


def _values_equal(gold, pred) -> bool:
    from math_verify.grader import safe_sympy_doit
    from sympy import Rational

    g, p = safe_sympy_doit(gold), safe_sympy_doit(pred)
    if not (getattr(g, "is_number", False) and getattr(p, "is_number", False)):
        return False
    if not (_has_float(g) or _has_float(p)):
        if g == p:
            return True
        if isinstance(g, Rational) and isinstance(p, Rational):
            return False
        return _is_zero_number(g - p)
    gv, pv = g.evalf(30), p.evalf(30)
    scale = max(abs(gv), abs(pv))
    if scale == 0:
        return True
    if bool(abs(gv - pv) <= REL_TOL * scale):
        return True
    return _rounds_to(g, p)


def _numeric_eq(gold, pred, float_rounding: int, numeric_precision: int) -> bool:
    # Same signature as math_verify.grader.sympy_numeric_eq, which it replaces; the precision args are unused.
    from math_verify.grader import get_pct_val, safe_sympy_doit
    from sympy import MatrixBase, MatrixExpr

    if isinstance(gold, (MatrixBase, MatrixExpr)) and isinstance(pred, (MatrixBase, MatrixExpr)):
        gold, pred = safe_sympy_doit(gold), safe_sympy_doit(pred)
        if isinstance(gold, MatrixBase) and isinstance(pred, MatrixBase) and gold.shape == pred.shape:
            return all(
                _numeric_eq(a, b, float_rounding, numeric_precision) for a, b in zip(gold.flat(), pred.flat())
            )
        return False
    if isinstance(gold, (MatrixBase, MatrixExpr)) or isinstance(pred, (MatrixBase, MatrixExpr)):
        return False
    try:
        if _values_equal(gold, pred):
            return True
        g_pct, p_pct = get_pct_val(gold), get_pct_val(pred)
        if (g_pct is None) != (p_pct is None):
            as_written_g = gold if g_pct is None else g_pct
            as_written_p = pred if p_pct is None else p_pct
            return _values_equal(as_written_g, as_written_p)
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False
    return False


@contextlib.contextmanager
def _strict_numbers():
    import math_verify.grader as grader

    saved = grader.sympy_numeric_eq
    grader.sympy_numeric_eq = _numeric_eq
    try:
        yield grader
    finally:
        grader.sympy_numeric_eq = saved


def _states_false_equality(expr) -> bool:
    """True for a chain like `2 = 3` (or `x = 2 = 3`): two numbers claimed equal that are not.

    math-verify grades an equation chain by its last side (`x = 5+6 = 11` is 11), which would let
    `\\boxed{2 = 3}` pass for 3; a link between two different numbers makes the whole answer false.
    """
    from latex2sympy2_extended.logic import And
    from sympy import Eq

    links = expr._unsorted_args if isinstance(expr, And) else [expr]
    for link in links:
        if (
            isinstance(link, Eq)
            and getattr(link.lhs, "is_number", False)
            and getattr(link.rhs, "is_number", False)
        ):
            try:
                if not _values_equal(link.lhs, link.rhs):
                    return True
            except (TypeError, ValueError, ArithmeticError, AttributeError):
                return False
    return False


def _approximations_hold(sides: list[str]) -> bool:
    r"""`a \approx b \approx ...`: every side is present, and two numbers side by side are equal or one is the
    other correctly rounded (`\pi \approx 3.14` holds, `2 \approx 3` and `\frac23 \approx 0.666` do not)."""
    if not all(side.strip() for side in sides):
        return False
    exprs = [parse_answer(side).expr for side in sides]
    for a, b in zip(exprs, exprs[1:]):
        if getattr(a, "is_number", False) and getattr(b, "is_number", False):
            try:
                if not (_values_equal(a, b) or _values_equal(b, a)):
                    return False
            except (TypeError, ValueError, ArithmeticError, AttributeError):
                return False
    return True


def _too_complex(answer: str) -> bool:
    """Longer than any real final answer, or nested deeper than any real one: skip the parser."""
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for c in answer:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth -= 1
    return deepest > MAX_NESTING


def _plain(text: str) -> str:
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox|textnormal)\s*\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text).lower()


@functools.lru_cache(maxsize=4096)  # samples of one prompt often give the same answer
def answers_equal(gold: str, pred: str) -> bool:
    """Is the extracted answer `pred` equivalent to the gold answer `gold`? Both are LaTeX strings.

    Never raises for odd input (returns False); may be slow on adversarial input such as `9^{9^{9}}`,
    so call it in a worker process with a hard time limit (see `pool.py`).
    """
    if not gold or not pred:
        return False
    g_letter = choice_letter(gold)
    if g_letter is not None:
        return choice_letter(pred) == g_letter
    plain_gold, plain_pred = _plain(gold), _plain(pred)
    if plain_gold == plain_pred:
        return True
    hedges = set(_HEDGE_RE.findall(plain_pred))
    if hedges and not hedges <= set(_HEDGE_RE.findall(plain_gold)):
        return False
    if _OR_RE.search(plain_pred) and not _LIST_MARK_RE.search(plain_gold):
        return False
    if _too_complex(gold) or _too_complex(pred):
        return False  # identical texts were accepted above; nothing this size is worth parsing
    if _INTEGER_RE.fullmatch(gold.strip()) and _INTEGER_RE.fullmatch(pred.strip()):
        return int(gold) == int(pred)
    sides = _APPROX_RE.split(pred)
    if len(sides) > 1:
        return _approximations_hold(sides) and any(answers_equal(gold, side) for side in sides)
    g, p = parse_answer(gold), parse_answer(pred)
    if g.expr is None or p.expr is None:
        return _plain(g.text) == _plain(p.text) and len(_plain(g.text)) > 0
    if _states_false_equality(p.expr):
        return False
    with _strict_numbers() as grader:
        try:
            return bool(
                grader.sympy_expr_eq(g.expr, p.expr, 6, 15, allow_set_relation_comp=False, strict=True)
            )
        except Exception:
            return False


def score_math(response: str, ground_truth: str) -> tuple[float, str | None]:
    """Score one math response against its gold answer: (1.0 or 0.0, failure kind or None).

    `ground_truth` may be a bare answer or a full solution with `\\boxed{}`; failure kinds: "malformed"
    (not strings), "no_answer" (nothing extractable in the response).
    """
    from fastprime.trainer.verifiers.math_answer import extract_answer, extract_answer_parts, extract_choice

    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return 0.0, "malformed"
    gold = extract_answer(ground_truth)
    if gold is None:
        return 0.0, "malformed"
    if choice_letter(gold) is not None:
        picked = extract_choice(response)
        if picked is None:
            return 0.0, "no_answer"
        return (1.0 if picked == choice_letter(gold) else 0.0), None
    parts = extract_answer_parts(response)
    if not parts:
        return 0.0, "no_answer"
    # Several candidates that all say the same thing ("\\boxed{1/2} ... \\boxed{0.5}") are one answer;
    # different ones stay a list, which only a list gold can match.
    if len(parts) > 1 and all(answers_equal(parts[-1], p) for p in parts[:-1]):
        parts = parts[-1:]
    pred = ", ".join(parts)
    return (1.0 if answers_equal(gold, pred) else 0.0), None
