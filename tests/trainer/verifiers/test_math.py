"""Math verifier: public grader test cases (not written by this project) and hand-written hacking probes.

Cases: ../shared/data/verifier_cases beside the checkout (Math-Verify, PRIME/verl and Qwen2.5-Math grader
tests; see its README). Strict cases only: `ambiguous` and `caveat` ones encode a tolerance policy or a grader convention.
These run in-process (no pool) because none of them is slow; hostile inputs go through the pool in
verifiers/test_pool.py.
"""

import functools
import json
import os
from pathlib import Path

import pytest

from fastprime.trainer.verifiers.math_answer import boxed_contents, extract_answer, extract_choice
from fastprime.trainer.verifiers.math_equal import answers_equal, score_math

# Beside the checkout, as in every workspace and in CI; never a machine path. Missing files fail the tests.
REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CASES_DIR = REPO / ".." / "shared" / "data" / "verifier_cases"
CASE_FILES = ["math_verify_cases.jsonl", "prime_cases.jsonl", "qwen_cases.jsonl"]

# Strict cases where this verifier's verdict differs from the file's, each for a stated reason.
KNOWN_DISAGREEMENTS = {
    # 0.33 for 1/3 (2 significant digits): Math-Verify's own test grades it at float_rounding=2; our policy
    # accepts a rounded decimal only with >= 3 significant digits, so "1.4" never passes for sqrt(2).
    ("math_verify_cases.jsonl", 134),
    # Same pair (1/3 vs 0.333, 4/3 vs 1.333) appears as True at float_rounding=3 (lines 271, 273) and
    # False at float_rounding=4: one grader cannot pass both; we follow the 3-significant-digit policy.
    ("math_verify_cases.jsonl", 272),
    ("math_verify_cases.jsonl", 274),
    # Gold "W(n) = 1 and W(n) = -1" (escaped backslashes, unclosed box) vs "W(x)=1orW(x)=-1": different
    # variable names under strict comparison.
    ("math_verify_cases.jsonl", 219),
    # "\frac{1}{2} \$ = \frac{10}{9}" for 10/9: a chain equating two different numbers is rejected as a
    # whole (else "\boxed{2 = 3}" would pass for 3); Math-Verify grades a chain by its last side.
    ("math_verify_cases.jsonl", 36),
    # A Python nested list "[[0,1], [1,0]]" as a matrix: not LaTeX, left unsupported.
    ("prime_cases.jsonl", 10),
}


def _strict_math_cases():
    out = []
    for name in CASE_FILES:
        if not (CASES_DIR / name).is_file():
            continue  # test_shared_cases_are_present fails and says where it looked
        for line_no, line in enumerate((CASES_DIR / name).read_text().splitlines(), 1):
            row = json.loads(line)
            if row.get("kind") == "math" and not row.get("ambiguous") and not row.get("caveat"):
                out.append(pytest.param(row, (name, line_no), id=f"{name}:{line_no}"))
    return out


STRICT = _strict_math_cases()


@functools.cache
def _verdict(key):
    row = next(p.values[0] for p in STRICT if p.values[1] == key)
    return score_math(row["pred"], row["gold"])[0] == 1.0


def test_shared_cases_are_present():
    for name in [*CASE_FILES, "math_verify_parse_cases.jsonl"]:
        assert (CASES_DIR / name).is_file(), (
            f"shared grader cases missing: looked for {CASES_DIR.resolve() / name}"
        )


def test_strict_case_count_and_accuracy_beats_math_verify():
    # The README measures math-verify 0.9.0 at 268 of these 285.
    assert len(STRICT) == 285
    correct = sum(
        (score_math(p.values[0]["pred"], p.values[0]["gold"])[0] == 1.0) == p.values[0]["expected"]
        for p in STRICT
    )
    assert correct == len(STRICT) - len(KNOWN_DISAGREEMENTS), f"{correct}/{len(STRICT)}"
    assert correct > 268


@pytest.mark.parametrize("row,key", STRICT)
def test_strict_case(row, key):
    verdict = _verdict(key)
    expected = row["expected"] != (key in KNOWN_DISAGREEMENTS)
    assert verdict == expected, (
        f"gold={row['gold'][:80]!r} pred=...{row['pred'][-120:]!r} got {verdict}, "
        f"extracted gold={extract_answer(row['gold'])!r} pred={extract_answer(row['pred'])!r}"
    )


def _parse_cases():
    path = CASES_DIR / "math_verify_parse_cases.jsonl"
    if not path.is_file():
        return []  # test_shared_cases_are_present fails and says where it looked
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # The string-extraction cases for choices A-D; the others test Math-Verify config switches.
    return [r for r in rows if "StringExtractionConfig(strings=('A', 'B', 'C', 'D')" in str(r.get("config"))]


@pytest.mark.parametrize("row", _parse_cases(), ids=lambda r: r["pred"][:30])
def test_multiple_choice_extraction_cases(row):
    expected = row["expected_parse"]
    got = extract_choice(row["pred"])
    if not expected:
        assert got is None
        assert score_math(row["pred"], "A")[0] == 0.0 and score_math(row["pred"], "B")[0] == 0.0
    else:
        assert got == expected[1], got
        assert score_math(row["pred"], expected[1])[0] == 1.0
        wrong = "D" if expected[1] != "D" else "C"
        assert score_math(row["pred"], wrong)[0] == 0.0


# (gold, response, expected score): hand-written probes of the weaknesses named in issues 4 and 9.
PROBES = [
    # hedges: several candidates never match a single gold
    ("2", r"The answer is \boxed{2 or 3}", 0),
    ("2", r"\boxed{2} or \boxed{3}", 0),
    ("3", r"so \boxed{2}. Alternatively \boxed{3}", 0),
    ("2", r"\boxed{2, 3}", 0),
    ("2", r"\boxed{2 \text{ or } 3}", 0),
    ("2", "The answer is 2 or 3.", 0),
    ("2", r"\boxed{\pm 2}", 0),
    ("2", r"\boxed{2 \text{ or possibly } 3}", 0),
    ("2", r"\boxed{2 \text{, maybe}}", 0),
    ("C", r"\boxed{C \text{ or } D}", 0),
    ("2", r"\boxed{2}, or maybe 3.", 0),  # a hedge right after the box
    ("2", r"\boxed{2}, but it might be 3", 0),
    ("2", r"\boxed{2} or $3$", 0),
    ("5", r"\boxed{5}, which is more than 3 or 4.", 1),  # "or" in a later clause is not a hedge
    ("2", r"\boxed{2}. Or equivalently $\frac{4}{2}$.", 1),  # candidates that agree are one answer
    ("0.5", r"\boxed{\frac12} so \boxed{0.5}", 1),
    ("3", "I think it is 2, but it could be 3.", 0),  # unboxed prose hedges
    ("3", "It is $2$ or maybe $3$", 0),
    ("3", "The result: 2. Or perhaps 3.", 0),
    ("7", "We have 3 apples and 4 pears, so 7 fruits.", 1),  # several numbers, no hedge
    ("42", "so we get\n#### 42", 1),
    # ...but a real list of solutions still matches a list gold
    (r"\{2,3\}", r"\boxed{2 \text{ or } 3}", 1),
    ("x=2, x=3", r"\boxed{x = 2 \text{ or } x = 3}", 1),
    ("2", r"\boxed{2} and later again \boxed{2}", 1),
    # tiny differences
    (r"\frac{1}{2006!}", r"\boxed{\frac{1}{2004!}}", 0),
    (r"\frac{1}{2006!}", r"\boxed{\frac{1}{2006!}}", 1),
    (r"2\times10^{-20}", r"\boxed{1\times 10^{-20}}", 0),
    ("2e-20", r"\boxed{1e-20}", 0),
    ("2e-20", r"\boxed{2\times 10^{-20}}", 1),
    ("1.5E+3", r"\boxed{1500}", 1),
    (r"\sqrt{2}", r"\boxed{\sqrt{2}+10^{-100}}", 0),
    ("1", r"\boxed{1+10^{-100}}", 0),
    ("0", r"\boxed{0.0000001}", 0),
    # equation chains: graded by the last side, unless two numbers are claimed equal that are not
    ("2", r"\boxed{2 \approx 3}", 0),
    ("3", r"\boxed{2 \approx 3}", 0),
    (r"\pi", r"\boxed{\pi \approx 3.14}", 1),
    ("3.14", r"\boxed{\pi \approx 3.14}", 1),
    (r"\frac13", r"\boxed{\frac{1}{3} \approx 0.333}", 1),
    (r"\frac23", r"\boxed{\frac{2}{3} \approx 0.666}", 0),  # truncated, not rounded: a false claim
    ("3", r"\boxed{x \approx 3}", 1),
    ("3", r"\boxed{2 = 3}", 0),
    ("3", r"\boxed{x = 2 = 3}", 0),
    ("3", r"\boxed{x = 1+2 = 3}", 1),
    # plain-text number formats
    ("1,2", r"\boxed{1, 2}", 1),  # a list, not 1.2
    ("1,22", "1.22", 1),  # a decimal comma
    (r"\$5.00", r"\boxed{5}", 1),
    ("B", r"\boxed{b}", 1),
    # relative tolerance 1e-4 and the rounding rule
    ("1000", r"\boxed{1000.00001}", 1),
    ("1000", r"\boxed{1000.3}", 0),
    (r"\frac13", r"\boxed{0.333}", 1),
    (r"\frac13", r"\boxed{0.3}", 0),
    (r"\sqrt2", r"\boxed{1.4}", 0),
    (r"\sqrt2", r"\boxed{1.41421}", 1),
    # percent policy (see math_equal's docstring)
    ("28", r"\boxed{0.28}", 0),
    ("28", r"\boxed{2800}", 0),
    ("28", r"\boxed{28\%}", 1),
    (r"28\%", r"\boxed{0.28}", 1),
    (r"28\%", r"\boxed{28}", 1),
    (r"28\%", r"\boxed{2800}", 0),
    (r"28\%", r"\boxed{0.28\%}", 0),
    ("0.28", r"\boxed{28\%}", 1),
    ("0.28", r"\boxed{28}", 0),
    # symbolic equality (the first: an upstream case whose expected verdict is mathematically wrong)
    (r"$1 - \frac{1}{\mathrm{e}}$", r"$1 + \frac{1}{\mathrm{e}}$", 0),
    (r"1 - \frac{1}{\mathrm{e}}", r"\boxed{1-e^{-1}}", 1),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1),
    (r"\sqrt2+\sqrt3", r"\boxed{\sqrt{5+2\sqrt6}}", 1),
    (r"\pi", r"\boxed{\pi}", 1),
    (r"\pi", r"\boxed{3.14}", 1),  # correctly rounded, 3 significant digits
    (r"\pi", r"\boxed{3.15}", 0),
    (r"\pi", r"\boxed{3.1}", 0),
    # multiple choice
    ("C", r"\boxed{C}", 1),
    ("C", "The answer is (C).", 1),
    ("(C)", r"\boxed{\text{C}}", 1),
    ("C", r"\boxed{D}", 0),
    ("A", "(A) 12, because the other options are too large", 1),
    ("A", "(A) or (B)", 0),
    ("A", "A, or maybe B.", 0),
    ("B", "B. Since angle A is 30 degrees, the rest follows.", 1),
    # equations and unicode
    ("3", r"x = \boxed{3}", 1),
    ("x=3", r"\boxed{3}", 1),
    ("-42", "The answer is \\boxed{\u221242}", 1),
    ("12", "\\boxed{\uff11\uff12}", 1),
    (r"\pi", "\\boxed{\u03c0}", 1),
    # a label inside the box is not part of the answer
    ("2", r"\boxed{\text{The answer is } 2}", 1),
    (r"\frac12", r"\boxed{\text{Final answer: } \frac{1}{2}}", 1),
    ("2", r"\boxed{\text{Answer: } 2 \text{ or } 3}", 0),
    # unboxed: only a committed answer scores (math_answer's rule 4). Each 0 here scored 1 before that rule.
    (
        "5",
        "Let me try x = 5. Substituting back gives 25 - 20 = 5, which does not check out. I cannot "
        "determine the answer.",
        0,
    ),
    (
        "5",
        "Solving 2x + 3 = 13 gives x = 5. But the question asks for y, and I'm not sure how to get y from "
        "the given information.",
        0,
    ),
    (
        "5",
        "The possible values are 3, 4 and 5; without more information I cannot determine which one is correct.",
        0,
    ),
    ("5", "We tried 5 earlier. I am unable to solve this problem.", 0),
    ("5", "So x = 5? No, that is wrong. Let me reconsider... I could not find the answer.", 0),
    ("5", "Plugging in n = 5 works for the first equation. I'm not sure what the final answer is.", 0),
    ("144", "Checking $n = 12$: $12^2 = 144$, which is too large. I could not find a value that works.", 0),
    ("12", "The answer is not 12.", 0),
    ("5", "It could be 5, I'm not sure.", 0),
    ("5", "I think the answer might be 5, but I'm not confident.", 0),
    (
        "12",
        "After trying a few values, the count seems to be around 12, but I can't be certain of the answer.",
        0,
    ),
    ("12", "The total comes out to 12? I don't know if this is right.", 0),
    ("12", "Perhaps the answer is $12$.", 0),
    ("12", "So the number of ways might be 12.", 0),
    # ...while committed statements still score, negated values are passed over, and pleasantries or a doubt
    # that came before the answer change nothing
    ("12", "So the number of ways is 12.", 1),
    ("12", "Final Answer: The final answer is $12$. I hope it is correct.", 1),
    ("12", "Hence there are 12 ways. <|im_end|>", 1),
    ("5", "The answer is not 6. It is 5.", 1),  # scored 0 before: the negated 6 was taken
    ("12", "We found 11 earlier, which is not right. The answer is 12.", 1),
    ("12", "x = 11 does not work, so x = 12.", 1),
    ("5", "It is not 6, so the answer is 5.", 1),
    ("12", "I was not sure at first, but the answer is 12.", 1),
    ("19", "Final Answer: The maximum number of points that could be in the domain of $f(x)$ is 19.", 1),
    ("5", "The answer is 5. Option B says 7, but that is wrong.", 1),
    # the same for letters: each scored 1 before
    ("C", "The answer is (C). Actually, I am not sure.", 0),
    ("C", "C. Hmm, I cannot determine which option is right.", 0),
    ("C", "Option C looks plausible, but I do not know.", 0),
    # nothing to grade
    ("2", "", 0),
    ("2", "no answer here at all", 0),
]


@pytest.mark.parametrize("gold,response,expected", PROBES, ids=[f"{g}|{r[:25]}" for g, r, _ in PROBES])
def test_probe(gold, response, expected):
    assert score_math(response, gold)[0] == expected


def test_eval_injection_is_never_executed(tmp_path):
    # One popular grader evals any answer containing \pi; the payload would create a file.
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for response in (
        rf"\boxed{{\pi + {payload}}}",
        rf"The answer is $\pi*{payload}$",
        f"The final answer is {payload}",
        f"answer: 3+{payload}",
    ):
        assert score_math(response, r"\pi")[0] == 0.0
    assert not marker.exists()
    assert not os.path.exists("/tmp/pwn")


def test_boxed_contents_balanced_and_deep():
    assert boxed_contents(r"a \boxed{\frac{1}{2}} b \fbox{3} c \boxed 7") == [r"\frac{1}{2}", "3", "7"]
    assert boxed_contents(r"\boxed{\{1,2\}}") == [r"\{1,2\}"]
    assert boxed_contents(r"\boxed{unclosed {") == []
    deep = "{" * 100_000 + "x" + "}" * 100_000
    assert boxed_contents(r"\boxed" + deep) == [deep[1:-1]]


def test_answers_equal_rejects_oversized_without_parsing():
    big = "1+" * 5000 + "1"
    assert answers_equal("10001", big) is False
    assert answers_equal(big, big) is True  # identical texts need no parsing


def test_malformed_inputs_are_counted_not_raised():
    assert score_math(None, "2") == (0.0, "malformed")
    assert score_math("\\boxed{2}", 2) == (0.0, "malformed")
    assert score_math("\\boxed{2}", "") == (0.0, "malformed")
    assert score_math("I do not know", "2") == (0.0, "no_answer")


INTEGER_PAIRS = [("12", "13"), ("12", "12"), ("007", "7"), ("-0", "0"), ("-5", "5"), ("-5", "-5"), ("0", "00"),
                 ("123456789012345678901234567890", "123456789012345678901234567891"),
                 ("123456789012345678901234567890", "123456789012345678901234567890")]  # fmt: skip


@pytest.mark.parametrize(("gold", "pred"), INTEGER_PAIRS)
def test_plain_integers_get_the_parsers_verdict(gold, pred):
    """Plain integers skip the LaTeX parser (answers_equal compares them as ints); the verdict must be the one
    the parser gives the same numbers when written so that they reach it (in braces) and int equality."""
    expected = int(gold) == int(pred)
    assert answers_equal.__wrapped__(gold, pred) is expected
    assert answers_equal.__wrapped__(gold, "{" + pred + "}") is expected
