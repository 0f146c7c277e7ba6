"""Prompts from local JSONL / Parquet files (PRIME/verl rows included), tokenised with the chat template.

Accepted row shapes (one JSON object per line, or one Parquet row):
- PRIME/verl: {"prompt": [{"role": ..., "content": ...}, ...], "reward_model": {"ground_truth": ...},
  "data_source": ..., "ability": "math" | "code", ...}
- plain: {"prompt": "text" or chat messages, "ground_truth": ..., "ability": optional, default "math"}
A malformed row raises ValueError naming the file and row (0-based), or is skipped and counted with
`bad_rows="skip"`. `PromptStream` walks a seeded shuffled order epoch after epoch and checkpoints its position.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

ABILITIES = ("math", "code")


@dataclass
class Prompt:
    """One training or evaluation prompt: token ids after the chat template plus what the verifier needs."""

    prompt_ids: list[int]
    ground_truth: Any
    ability: str = "math"
    data_source: str = ""
    messages: list[dict] = field(default_factory=list)


@dataclass
class LoadStats:
    """Rows read, and rows dropped (malformed when skipping; longer than the prompt limit)."""

    rows: int = 0
    bad_rows: int = 0
    too_long: int = 0
    first_errors: list[str] = field(default_factory=list)


def read_rows(path: str | pathlib.Path) -> list[dict]:
    """All rows of a .jsonl or .parquet file as dicts; a line that is not a JSON object raises ValueError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise ValueError(f"{path}: cannot read Parquet: {e}") from None
    if path.suffix != ".jsonl":
        raise ValueError(f"data file {str(path)!r} must end in .jsonl or .parquet")
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(_BadRow(f"{path}: row {line_no} (line {line_no + 1}) is not valid JSON: {e.msg}"))
                continue
            rows.append(row)
    return rows


class _BadRow(dict):
    """Placeholder for a line that did not parse, so that `parse_row` reports it like any malformed row."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message


def parse_row(row: dict, *, where: str) -> tuple[list[dict], Any, str, str]:
    """(messages, ground_truth, ability, data_source) of one row; raises ValueError prefixed with `where`."""
    if isinstance(row, _BadRow):
        raise ValueError(row.message)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if "prompt" not in row:
        raise ValueError(f"{where}: missing 'prompt' (keys: {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for j, m in enumerate(prompt):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: prompt message {j} must be {{'role': str, 'content': str}}, got {m!r}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise ValueError(
            f"{where}: 'prompt' must be a string or a non-empty list of chat messages, got {prompt!r}"
        )
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        ground_truth = reward_model["ground_truth"]
    elif "ground_truth" in row:
        ground_truth = row["ground_truth"]
    else:
        raise ValueError(f"{where}: missing the answer: need 'reward_model.ground_truth' or 'ground_truth'")
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        raise ValueError(f"{where}: empty ground_truth")
    ability = row.get("ability") or "math"
    if ability not in ABILITIES:
        raise ValueError(f"{where}: ability={ability!r} has no verifier (known: {ABILITIES})")
    return messages, ground_truth, ability, str(row.get("data_source") or "")


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template with the generation prompt appended."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model without a template: the plain concatenation of the contents
        text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompts(
    rows: list[dict],
    tokenizer,
    *,
    source: str,
    max_prompt_tokens: int,
    bad_rows: Literal["error", "skip"] = "error",
) -> tuple[list[Prompt], LoadStats]:
    """Parse and tokenise rows; `source` names the file in error messages. Over-long prompts are dropped and counted."""
    stats = LoadStats(rows=len(rows))
    prompts = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        try:
            messages, gt, ability, data_source = parse_row(row, where=where)
        except ValueError as e:
            if bad_rows == "error":
                raise
            stats.bad_rows += 1
            if len(stats.first_errors) < 5:
                stats.first_errors.append(str(e))
            continue
        ids = render_prompt(messages, tokenizer)
        if len(ids) > max_prompt_tokens:
            stats.too_long += 1
            continue
        prompts.append(Prompt(ids, gt, ability, data_source, messages))
    if not prompts:
        raise ValueError(
            f"{source}: no usable prompts among {stats.rows} rows "
            f"({stats.bad_rows} malformed, {stats.too_long} longer than {max_prompt_tokens} tokens)"
        )
    return prompts, stats


def load_prompts(
    path: str | pathlib.Path,
    tokenizer,
    *,
    max_prompt_tokens: int,
    bad_rows: Literal["error", "skip"] = "error",
) -> tuple[list[Prompt], LoadStats]:
    """Read a .jsonl/.parquet file and return its prompts plus load statistics."""
    return build_prompts(
        read_rows(path), tokenizer, source=str(path), max_prompt_tokens=max_prompt_tokens, bad_rows=bad_rows
    )


class PromptStream:
    """Endless seeded order over `n` prompts: a fresh permutation each epoch; `state_dict` saves the position.

    One `take` never returns an index twice: where it crosses into a new epoch, an index it already returned
    is deferred within the new epoch's order (swapped with the next one not yet taken), so every epoch still
    visits every prompt once. The order, swaps included, is part of the state, so resume replays it."""

    def __init__(self, n: int, *, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError(f"PromptStream needs at least one prompt, got n={n}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int, *, exclude: Collection[int] = ()) -> list[int]:
        """The next `count` distinct prompt indices, none in `exclude`, wrapping into a new epoch as needed.

        `exclude`: indices sampled in the same round from elsewhere (the refill buffer); met in the stream's
        current epoch they count as visited (they are being sampled now) and are passed over."""
        taken = set(exclude)
        if count + len(taken) > self.n:
            raise ValueError(
                f"cannot take {count} distinct prompts besides {len(taken)} others from {self.n}"
            )
        out: list[int] = []
        while len(out) < count:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            i = self._order[self.pos]
            if i in out:  # met again in the next epoch within this take: defer it within that epoch
                j = next(j for j in range(self.pos + 1, self.n) if self._order[j] not in taken)
                self._order[self.pos], self._order[j] = self._order[j], i
                i = self._order[self.pos]
            self.pos += 1
            if i not in taken:
                out.append(i)
                taken.add(i)
        return out

    def state_dict(self) -> dict:
        return {
            "n": self.n, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "pos": self.pos,
            "order": list(self._order),
        }  # fmt: skip

    def load_state_dict(self, d: dict) -> None:
        if d["n"] != self.n:
            raise ValueError(f"checkpoint was taken over {d['n']} prompts, this run has {self.n}")
        self.seed, self.shuffle, self.epoch, self.pos = d["seed"], d["shuffle"], d["epoch"], d["pos"]
        self._order = list(d["order"]) if "order" in d else self._make_order()


def eval_row(p: Prompt) -> dict:
    """A held-out prompt as the PRIME/verl row `greedy_accuracy` grades."""
    return {"prompt": p.messages, "ability": p.ability, "reward_model": {"ground_truth": p.ground_truth}}


def load_data(cfg, tok) -> tuple[list[Prompt], list[dict], list[dict], dict]:
    """(training prompts, held-out rows for greedy evaluation, demo training rows for the warm start, load stats)."""
    dc = cfg.data
    if dc.source == "demo":
        from fastprime.trainer.demo import make_arithmetic_rows

        train_rows = make_arithmetic_rows(dc.demo_train_rows, seed=cfg.train.seed)
        eval_rows = make_arithmetic_rows(dc.demo_eval_rows, seed=cfg.train.seed, split="test")
        prompts, stats = build_prompts(
            train_rows, tok, source="demo task", max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
        )
        return prompts, eval_rows[: cfg.eval.max_rows], train_rows, {"data/too_long": stats.too_long}
    prompts, stats = load_prompts(
        dc.train_path, tok, max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
    )
    eval_rows = []
    if cfg.eval.path:
        held_out, _ = load_prompts(
            cfg.eval.path, tok, max_prompt_tokens=dc.max_prompt_tokens, bad_rows=dc.bad_rows
        )
        eval_rows = [eval_row(p) for p in held_out[: cfg.eval.max_rows]]
    return prompts, eval_rows, [], {"data/bad_rows": stats.bad_rows, "data/too_long": stats.too_long}
