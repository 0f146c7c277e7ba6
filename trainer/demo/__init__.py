"""The built-in demo: a synthetic arithmetic task, an offline character tokenizer and a tiny Qwen2 model."""

from fastprime.trainer.demo.model import build_tiny_model
from fastprime.trainer.demo.task import make_arithmetic_rows
from fastprime.trainer.demo.tokenizer import build_tokenizer

__all__ = ["build_tiny_model", "build_tokenizer", "make_arithmetic_rows"]
