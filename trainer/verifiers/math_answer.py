"""Final-answer extraction from a model's math response (and from a gold answer or gold solution).

Order of precedence, applied to the response text (NFKC-folded first):
1. every `\\boxed{...}` / `\\fbox{...}` (balanced braces, linear scan, any nesting depth). One distinct box is
   the answer; several *different* boxes are all kept as candidates, and so is a hedge in the sentence right
   after the last box ("\\boxed{2}, or maybe 3"). The grader reads the candidates as one list "a, b": it
   matches a gold that really is {a, b} and never a gold of a alone (candidates that are equivalent to each
   other, like `\\frac12` and `0.5`, count as one answer: see `math_equal.score_math`). A "Final answer: ..."
   statement written after the last box wins over the boxes.
2. a bare answer: short text with no LaTeX delimiters and no prose is taken whole (gold answers are mostly
   like this: "\\frac{1}{2}", "(1,4.5]", "x=3"), with plain-text digit grouping and decimal commas read.
3. without a box: a multiple-choice letter after "answer is"; "the answer is 2 or 3" and prose ending in a
   hedge between numbers ("it is 2, but it could be 3") become lists; otherwise math-verify 0.9.0's anchored
   extraction ("final answer is $...$", "answer: ...", the last LaTeX environment, the last number), with its
   plain-expression parser replaced by the LaTeX parser so that nothing a model wrote is ever passed to
   Python's `eval` (sympy's `parse_expr` evals its input).
4. an unboxed answer counts only if the response commits to it. A value merely mentioned ("we tried 5") and
   then walked away from must not score, because a policy learns to write the likely number and then decline.
   Going through the candidates of 3 in their order of preference:
   - a value its own sentence negates ("the answer is not 5", "x \\neq 5", "5 does not work", "5 is wrong")
     is passed over: it says what the answer is not, and a later statement may still give one ("... It is 6.");
   - a value its own sentence hedges (maybe, perhaps, possibly, probably, I guess; "might be 5",
     "could be 5") or asks ("So x = 5?") ends the search with no answer: the final statement is not committed;
   - a decline anywhere after a value withdraws it and every earlier one, so there is no answer ("I cannot
     determine ...", "I don't know", "I'm not sure/certain/confident", "I give up"). Strict on purpose: an
     unboxed response that voices doubt after its value scores 0 even if the doubt was about its method. A
     refutation whose referent is unclear ("but that is wrong") is not a decline.
   Sentences after the value that neither decline nor state a value ("I hope it is correct", a chat
   template's end token) do not matter, and a decline before the value ("I was not sure at first, but the
   answer is 5") does not withdraw it. The decline rule applies to the letters and lists of 3 too. Boxed
   answers are commitments by themselves (rule 1 handles their hedges).
The result is a LaTeX string; `math_equal` parses and compares it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["boxed_contents", "extract_answer", "extract_answer_parts", "extract_choice", "choice_letter"]

# A response longer than this is cut to its tail before the regex fallbacks: the answer is at the end, and the
# math-verify regexes are super-linear on long inputs.
MAX_TAIL_CHARS = 8000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_DELIMS_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # an escaped \$ is a currency sign, not math
# Three or more letters in a row that are not a LaTeX command: prose, not an answer.
_PROSE_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_ANSWER_WORDS = {"and", "or", "pct", "percent", "percentage", "cm", "mm", "km", "inches", "feet", "meters"}
_ANSWER_PHRASE_RE = re.compile(r"(?i)answer(?:\s+is)?\s*:?\s*([^\n]{1,100}?)(?:\.\s|\.$|\n|$)")
_HEDGE_WORD_RE = re.compile(r"(?i)(?<![a-z\\])(or|either|maybe|possibly|perhaps|probably)(?![a-z])")
# A label some models put inside the box: "\boxed{\text{The answer is } 2}", "\boxed{\text{Final answer: } x}".
_ANSWER_LABEL_RE = re.compile(
    r"^\s*\\(?:text|textbf|mathrm)\s*\{\s*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*:?\s*\}\s*:?",
    re.IGNORECASE,
)
_CHOICE_LETTER_RE = re.compile(r"(?<![\w\\])([A-E])(?![\w])")
_HEDGE_PROSE_RE = re.compile(r"(?i)\b(?:or|either|maybe|possibly|perhaps|probably|could be|might be)\b")
_STRONG_HEDGE_RE = re.compile(
    r"(?i)\b(?:either|maybe|possibly|perhaps|probably|could be|might be|alternatively)\b"
)
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\d)")
# Commitment of an unboxed answer (module docstring, rule 4). A decline anywhere after a value withdraws it.
_DECLINE_RE = re.compile(
    r"(?i)\b(?:(?:can\s*not|can't|could\s*not|couldn't|unable\s+to|not\s+able\s+to)\s+(?:be\s+)?"
    r"(?:determine|find|found|solve|solved|figure|work\s+out|compute|computed|calculate|conclude|decide|tell|"
    r"answer|sure|certain)"
    r"|(?:do|did)\s*(?:not|n't)\s+know|not\s+(?:sure|certain|confident)|give\s+up|gave\s+up)\b"
)
# A value its own sentence denies: "is not 5", "isn't 5", "\neq 5" just before it; "5 is wrong" or
# "5 does not work" after it.
_NEGATED_BEFORE_RE = re.compile(r"(?i)(?:\bnot|n't|\\neq|\u2260)\s*(?:equal\s+to\s*)?[$(\\\[]*\s*$")
_REFUTED_AFTER_RE = re.compile(
    r"(?i)^[^.!?\n]*?\b(?:is|was|are)\s*(?:not|n't)\s+(?:the\s+answer|correct|right|valid|a\s+solution)\b"
    r"|^[^.!?\n]*?\b(?:is|was)\s+(?:wrong|incorrect)\b"
    r"|^[^.!?\n]*?\b(?:does|did|do)\s*(?:not|n't)\s+(?:work|satisfy|check)\b"
)
# Uncertainty in the value's own sentence. "might"/"could" only right before the value: "the points that could
# be in the domain number 19" is a statement.
_UNSURE_RE = re.compile(r"(?i)\b(?:maybe|perhaps|possibly|probably|i\s+guess|guessing)\b")
_MODAL_BEFORE_RE = re.compile(r"(?i)\b(?:might|could|may)\s+(?:well\s+|also\s+)?be\s*[$(\\\[]*\s*$")
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)|\n")
_UPRIGHT_LETTER_RE = re.compile(r"\\(?:mathrm|rm|mathit|mathnormal)\s*\{\s*([a-zA-Z])\s*\}")
_FINAL_ANSWER_RE = re.compile(r"(?i)final answer")
_CHOICE_RE = re.compile(r"^\s*(?:\\text(?:bf)?\{\s*)?\(?\s*([A-Ea-e])\s*\)?\s*\}?\s*\.?\s*$")
_CHOICE_IN_TEXT_RE = re.compile(
    r"(?i:answer|choice|option)(?:\s+is)?\s*:?\s*(?:\*\*)?\s*\(?([A-E])\)?(?:\*\*)?(?=\s*$|[.,;:])"
)


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}`/`\\fbox{...}` in `text`, in order; an unclosed box is ignored.

    Braces are matched by a counting scan (no recursion), so arbitrarily deep nesting costs linear time.
    `\\boxed 5` (no brace) yields the next token, as LaTeX does.
    """
    return [content for content, _ in _boxed_spans(text)]


def _boxed_spans(text: str) -> list[tuple[str, int]]:
    """(content, end offset) of every box; see `boxed_contents`."""
    out = []
    pos = 0
    n = len(text)
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out
        if m.group(1) is None:
            tok = re.match(r"\s*([^\s$\\{}]+)", text[m.end() :])
            if tok:
                out.append((tok.group(1), m.end() + tok.end()))
            pos = m.end()
            continue
        depth, i = 1, m.end()
        while i < n and depth:
            c = text[i]
            if c == "\\" and i + 1 < n:
                i += 2  # an escaped brace \{ or \} does not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth:
            return out
        out.append((text[m.end() : i - 1], i))
        pos = i


def _is_bare_answer(text: str) -> bool:
    if len(text) > 200 or _DELIMS_RE.search(text):
        return False
    latex_words = r"\\(?:text\w*|begin|end|operatorname|mathrm|mbox)\s*\{[^{}]*\}"
    words = [w.lower() for w in _PROSE_WORD_RE.findall(re.sub(latex_words, " ", text))]
    return all(w in _ANSWER_WORDS for w in words)


def _plain_number(text: str) -> str:
    # Plain-text number formats (not LaTeX): "1 000" groups digits, "1000,99" and "0,5" use a decimal comma.
    # "1,000" stays a thousands separator and "1, 2" (with a space) stays a list.
    t = text.strip()
    if re.fullmatch(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?", t):
        return t.replace(" ", "")
    # "1,2" and "10,20" stay lists; a decimal comma needs a 0, 4+ digits, or cents after one digit.
    m = re.fullmatch(r"-?(\d+),(\d+)", t)
    if m and (m.group(1) == "0" or len(m.group(1)) >= 4 or (len(m.group(1)) == 1 and len(m.group(2)) == 2)):
        return t.replace(",", ".")
    return t


def choice_letter(answer: str) -> str | None:
    """The multiple-choice letter A-E (upper case) if `answer` is only a letter ("C", "(c)", "\\text{(C)}")."""
    m = _CHOICE_RE.match(answer)
    return m.group(1).upper() if m else None


class _Candidate(NamedTuple):
    answer: str
    parsed: bool  # math-verify's parser read it
    start: int  # where the value itself (not its anchor phrase) stands in the text
    end: int


def _math_verify_candidates(text: str) -> Iterator[_Candidate]:
    """Every match of math-verify's `extract_target_from_pred` patterns, in its order of preference (priority
    group, then the latest match first), with the span of the value itself. Lazy: each match costs a parse."""
    from itertools import groupby

    from math_verify.grader import get_pct_val
    from math_verify.parser import (
        ExprExtractionConfig,
        LatexExtractionConfig,
        extract_match,
        get_extraction_regexes,
    )

    from fastprime.trainer.verifiers.math_parse import no_eval_expr_parser

    regexes = get_extraction_regexes([LatexExtractionConfig(), ExprExtractionConfig()])
    patterns = sorted(((p, t, prio) for pats, t in regexes for p, prio in pats), key=lambda x: x[2])
    with no_eval_expr_parser():
        for _, group in groupby(patterns, key=lambda x: x[2]):
            matches = [(m, t) for p, t, _ in group for m in p.finditer(text)]
            matches.sort(key=lambda x: (x[0].end(), -x[0].start()), reverse=True)
            for m, target in matches:
                expr, string = extract_match(m, target)
                if not string:
                    continue
                if expr is not None and get_pct_val(expr) is not None and "%" not in string:
                    string += r"\%"
                spans = [m.span(g) for g in m.re.groupindex if m.group(g) is not None] or [m.span()]
                yield _Candidate(string, expr is not None, min(a for a, _ in spans), max(b for _, b in spans))


def _math_verify_fallback(text: str) -> str | None:
    """math-verify's `extract_target_from_pred` (same patterns, priorities and order), returning the string of
    the match that parsed rather than of the first match tried."""
    found = next(_parsed_first(_math_verify_candidates(text)), None)
    return found.answer if found else None


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter A-E a response picks, for a gold that is a letter; None if unclear.

    A boxed or "answer is" letter first; then a response that starts with "B." or "(B)"; then the only
    stand-alone capital A-E in the text (two different ones are ambiguous: None). As for values (module
    docstring, rule 4), a decline after the letter withdraws it.
    """
    answer = extract_answer(text)
    if answer is not None and choice_letter(answer):
        return choice_letter(answer)
    if not isinstance(text, str):
        return None
    m = re.match(r"\s*(?:\*\*)?(?:\(([A-E])\)|([A-E])(?:\*\*)?(?:[.:,)]|\s*$))", text)
    if m:
        # "(A) or (B)" opens with a letter but offers two.
        first_line = text.strip().split("\n", 1)[0]
        if len(set(_CHOICE_LETTER_RE.findall(first_line))) > 1 and _HEDGE_PROSE_RE.search(first_line):
            return None
        return None if _DECLINE_RE.search(text, m.end()) else m.group(1) or m.group(2)
    tail = text[-MAX_TAIL_CHARS:]
    letters = set(_CHOICE_LETTER_RE.findall(tail))
    if len(letters) != 1 or _DECLINE_RE.search(tail, _last_match(_CHOICE_LETTER_RE, tail).end()):
        return None
    return letters.pop()


def extract_answer(text: str) -> str | None:
    """The final answer of a response (or of a gold solution) as a LaTeX string, or None if there is none.

    `text` is the full model output; see the module docstring for the precedence. Several candidates
    (different boxes, a hedge) come back joined as a list "a, b".
    """
    parts = extract_answer_parts(text)
    return ", ".join(parts) if parts else None


def extract_answer_parts(text: str) -> list[str] | None:
    """Like `extract_answer`, but the candidates separately: one string, or several when the response
    boxes different answers or hedges right after its box ("\\boxed{2}, or maybe 3")."""
    if not isinstance(text, str):
        return None
    # NFKC folds full-width digits and letters; a unicode minus would hide a number's sign from the regexes.
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-").strip()
    # math-verify's normaliser drops "\mathrm{e}" as if it were a unit ("1 - \frac{1}{\mathrm{e}}" -> "1 -
    # \frac{1}{"), so an upright single letter is written plain first.
    text = _UPRIGHT_LETTER_RE.sub(r"\1", text)
    if not text:
        return None
    spans = _boxed_spans(text)
    boxes = [_ANSWER_LABEL_RE.sub("", b).strip() for b, _ in spans]
    boxes = [b for b in boxes if b]
    if boxes:
        after = text[spans[-1][1] :]
        # "Final answer: ... is $x$" written after the last box states the answer outright and wins.
        if _FINAL_ANSWER_RE.search(after[-MAX_TAIL_CHARS:]):
            stated = _math_verify_fallback(after[-MAX_TAIL_CHARS:])
            if stated and _strip_end(stated):
                return [_strip_end(stated)]
        boxes += _hedge_after_box(after)
        distinct: list[str] = []
        seen = set()
        for b in boxes:
            key = re.sub(r"\s+", "", b)
            if key not in seen:
                seen.add(key)
                distinct.append(b)
        parts = [p for p in map(_strip_end, distinct) if p]
        return parts or None
    answer = _extract_unboxed(text)
    return [answer] if answer else None


def _hedge_after_box(after: str) -> list[str]:
    """Candidates offered right after the last box, in the same sentence, with a hedging word."""
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])|\n\s*\n", after[:300], maxsplit=1)[0]
    maths = re.findall(r"\$([^$]+)\$|\\\((.+?)\\\)", sentence)
    prose = re.sub(r"\$[^$]*\$|\\\(.*?\\\)", " ", sentence)
    # "or" is too common to count anywhere ("5, which is more than 3 or 4"): only right after the box.
    if not (_STRONG_HEDGE_RE.search(prose) or re.match(r"\s*[,;(]?\s*or\b", sentence, re.IGNORECASE)):
        return []
    return [a or b for a, b in maths] + _NUMBER_RE.findall(prose)


def _extract_unboxed(text: str) -> str | None:
    if _is_bare_answer(text):
        return _plain_number(text)
    tail = text[-MAX_TAIL_CHARS:]
    m = _last_match(_CHOICE_IN_TEXT_RE, tail)
    if m is not None and not re.search(r"\$|\\\(", tail[m.end() : m.end() + 3]):
        return m.group(1) if not _DECLINE_RE.search(tail, m.end()) else None
    phrase = _last_match(_ANSWER_PHRASE_RE, tail)
    if phrase is not None and _HEDGE_WORD_RE.search(phrase.group(1)):
        # "The answer is 2 or 3." states two candidates; keep them both so the grader sees a hedge.
        if _DECLINE_RE.search(tail, phrase.end()):
            return None
        return _strip_end(phrase.group(1).replace("$", " ").strip())
    hedge = _hedged_numbers(tail)
    if hedge is not None:
        return hedge
    return _committed_answer(tail)


def _committed_answer(text: str) -> str | None:
    """The value the response commits to, among math-verify's candidates in its order (see the module
    docstring): a negated value is passed over; a hedged or questioned one, or any value followed by a
    decline, means the response commits to nothing."""
    for c in _parsed_first(_math_verify_candidates(text)):
        if _DECLINE_RE.search(text, c.end):
            return None
        begin = max((m.end() for m in _SENTENCE_END_RE.finditer(text, 0, c.start)), default=0)
        stop = _SENTENCE_END_RE.search(text, c.end)
        before, after = text[begin : c.start], text[c.end : stop.end() if stop else len(text)]
        if _NEGATED_BEFORE_RE.search(before) or _REFUTED_AFTER_RE.search(after):
            continue
        unsure = _UNSURE_RE.search(before + " " + after) or _MODAL_BEFORE_RE.search(before)
        if unsure or after.rstrip().endswith("?"):
            return None
        return _strip_end(c.answer)
    return None


def _parsed_first(candidates: Iterator[_Candidate]) -> Iterator[_Candidate]:
    """The candidates that parsed, in order; only if none did, the first that did not (math-verify's choice)."""
    any_parsed, unparsed = False, None
    for c in candidates:
        if c.parsed:
            any_parsed = True
            yield c
        elif unparsed is None:
            unparsed = c
    if not any_parsed and unparsed is not None:
        yield unparsed


def _hedged_numbers(text: str) -> str | None:
    """Unboxed prose that ends by hedging between numbers ("it is 2, but it could be 3") -> "2, 3".

    Only the last two sentences are read; without this the fallback would take the last number (3) and
    accept the hedge for a gold of 3.
    """
    sentences = [x for x in _SENTENCE_SPLIT_RE.split(text[-600:]) if x.strip()]
    ending = " ".join(sentences[-2:])
    # Only the words around the math count: "or" inside $...$ joins a list of answers, like a comma.
    prose = re.sub(r"\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", " ", ending)
    if not _HEDGE_PROSE_RE.search(prose):
        return None
    numbers = list(dict.fromkeys(_NUMBER_RE.findall(ending)))
    return ", ".join(numbers) if len(numbers) >= 2 else None


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - keeping the last one is the point
        pass
    return last


def _strip_end(answer: str) -> str | None:
    # A sentence's full stop is not part of the answer ("... is 2/3.").
    answer = re.sub(r"(?:\s|\\[,;!]|[.;:,])+$", "", answer)
    return answer or None
