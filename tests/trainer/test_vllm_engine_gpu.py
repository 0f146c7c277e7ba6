"""The vLLM engine's GPU-only features: sleep mode between phases and gpu_memory_utilization (CUDA only)."""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("vllm", reason="the vllm extra is not installed (see README)")

from test_vllm_engine import sharp  # noqa: E402  (a random model whose greedy responses vary by prompt)

from fastprime.trainer.demo import build_tokenizer  # noqa: E402
from fastprime.trainer.models import init_distributed  # noqa: E402
from fastprime.trainer.vllm_engine import VLLMRolloutEngine  # noqa: E402

pytestmark = pytest.mark.gpu
MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    init_distributed()
    tok = build_tokenizer()
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    sharp(tok, 3).save_pretrained(folder)
    eng = VLLMRolloutEngine(
        folder,
        eos_token_ids=[tok.eos_token_id],
        max_new_tokens=MAX_NEW,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.2,
        sleep_mode=True,
    )
    prompts = [tok(f"<|user|>{q}<|assistant|>")["input_ids"] for q in ["1+2=", "7-3*2=", "(4+5)*3=", "9="]]
    yield tok, eng, prompts
    eng.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def greedy_ids(eng, prompts):
    return [r.response_ids for r in eng.greedy(prompts, max_new_tokens=MAX_NEW)]


def test_sleep_level1_frees_kv_cache_and_wakes_unchanged(setup):
    tok, eng, prompts = setup
    before = greedy_ids(eng, prompts)
    free_awake = torch.cuda.mem_get_info()[0]
    eng.sleep(level=1)
    assert torch.cuda.mem_get_info()[0] > free_awake, "sleep should return the KV cache's memory"
    with pytest.raises(RuntimeError, match="asleep"):
        eng.greedy(prompts, max_new_tokens=MAX_NEW)
    eng.wake_up()
    assert greedy_ids(eng, prompts) == before


def test_sleep_level2_sync_then_wake_uses_new_weights(setup):
    tok, eng, prompts = setup
    new = sharp(tok, 4).cuda()
    eng.sleep(level=2)  # weights discarded: the sync below must bring all of them back
    eng.sync_weights(new.state_dict())
    eng.wake_up()
    want = []
    for p in prompts:
        out = new.generate(
            torch.tensor([p], device="cuda"),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        want.append(out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out)
    assert greedy_ids(eng, prompts) == want
