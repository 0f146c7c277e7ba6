"""The demo task's rows: well-formed, arithmetically right (checked independently), disjoint splits."""

import ast
import operator
import re

import pytest

from fastprime.trainer.demo import make_arithmetic_rows
from fastprime.trainer.demo.task import format_problem
from fastprime.trainer.verifiers import verify_batch

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expr: str) -> int:
    """Independent evaluation of a problem by Python's own parser (precedence and parentheses)."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant), ast.dump(node)
        return node.value

    return walk(ast.parse(expr, mode="eval").body)


ROWS = make_arithmetic_rows(500, seed=3)


def test_rows_have_the_prime_verl_shape():
    for row in ROWS:
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == "fastprime/arithmetic"
        assert row["ability"] == "math"
        assert row["reward_model"]["style"] == "rule"
        assert isinstance(row["reward_model"]["ground_truth"], str)
        (msg,) = row["prompt"]
        assert msg["role"] == "user" and msg["content"]


def test_problem_answer_and_every_solution_step_are_right():
    n_ops_seen = set()
    for row in ROWS:
        problem = row["prompt"][0]["content"]
        gold = int(row["reward_model"]["ground_truth"])
        assert _evaluate(problem) == gold, problem
        *steps, last = row["extra_info"]["solution"].split("\n")
        assert last == f"\\boxed{{{gold}}}"
        assert 2 <= len(steps) <= 4, row
        n_ops_seen.add(len(steps))
        value = None
        for line in steps:
            m = re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)", line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            if value is not None:
                assert a == value, f"step {line!r} does not continue from {value}"
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], line
            assert (1 <= b <= 20) if op in "+-" else (2 <= b <= 5), line
            assert 0 <= c <= 200, line
            value = c
        assert value == gold
    assert n_ops_seen == {2, 3, 4}


def test_parentheses_keep_step_order():
    assert format_problem(7, [("+", 5), ("*", 3), ("-", 4)]) == "(7+5)*3-4"
    assert format_problem(7, [("*", 5), ("+", 3), ("*", 2)]) == "(7*5+3)*2"
    assert format_problem(7, [("*", 2), ("*", 3)]) == "7*2*3"


def test_deterministic_distinct_and_test_split_disjoint_from_train():
    assert make_arithmetic_rows(50, seed=3) == ROWS[:50]
    assert make_arithmetic_rows(50, seed=4) != ROWS[:50]
    train = {r["prompt"][0]["content"] for r in make_arithmetic_rows(4000, seed=0)}
    assert len(train) == 4000
    for seed in (0, 1, 2):
        test = [r["prompt"][0]["content"] for r in make_arithmetic_rows(300, seed=seed, split="test")]
        assert len(set(test)) == 300
        assert not train & set(test)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="-1"):
        make_arithmetic_rows(-1, seed=0)
    with pytest.raises(ValueError, match="'valid'"):
        make_arithmetic_rows(3, seed=0, split="valid")


def test_gold_answers_pass_the_real_verifier_and_wrong_ones_fail():
    rows = ROWS[:40]
    good = [
        {
            "ability": "math",
            "response": r["extra_info"]["solution"],
            "ground_truth": r["reward_model"]["ground_truth"],
        }
        for r in rows
    ]
    bad = [dict(it, ground_truth=str(int(it["ground_truth"]) + 1)) for it in good]
    assert verify_batch(good) == [1.0] * len(rows)
    assert verify_batch(bad) == [0.0] * len(rows)
