"""``q4lab.plan_qlora`` (q4lab/plan.py) against measured figures: its storage parts against the
bytes bench/bench_fsdp.py measured on 1 and 2 ranks, and its device peak against the peaks
Answer.AI published for FSDP-QLoRA on 2 x 24 GB GPUs (github.com/AnswerDotAI/fsdp_qlora,
README "Finetune Llama-2 70B on Dual 24GB GPUs" and benchmarks_03_2024.md: bf16, LoRA r=64 on
every linear layer, reentrant gradient checkpointing; batch is per GPU; peak = reserved GiB)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import q4lab
from q4lab.plan import GIB, MARGIN, plan_qlora

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"

PUBLISHED = [  # (model, context length, batch per GPU, CPU offload, peak GiB)
    ("llama-2-70b", 2048, 2, True, 14.92),   # the famous one: 70B on two 24 GB cards
    ("yi-34b", 2048, 2, False, 23.05),
    ("yi-34b", 2048, 4, True, 22.98),
    ("llama-2-7b", 512, 1, False, 4.98),
    ("llama-2-7b", 2048, 1, False, 5.21),
    ("llama-2-7b", 2048, 4, False, 11.22),
    ("llama-2-7b", 2048, 10, False, 20.97),
]


@pytest.mark.parametrize("model, seq, batch, offload, peak", PUBLISHED)
def test_device_peak_within_the_stated_margin_of_answer_ai_runs(model, seq, batch, offload, peak):
    plan = plan_qlora(model, world_size=2, device_memory=24 * GIB, seq_len=seq, batch=batch,
                      lora_rank=64, gradient_checkpointing=True, offload_params=offload)
    assert abs(plan.device_total / GIB - peak) <= MARGIN * peak, plan
    assert plan.fits


def test_70b_on_two_24gb_cards_needs_cpu_offload():
    kw = dict(world_size=2, device_memory=24 * GIB, seq_len=2048, batch=2, lora_rank=64)
    assert plan_qlora("llama-2-70b", offload_params=True, **kw).fits
    without = plan_qlora("llama-2-70b", offload_params=False, **kw)
    assert not without.fits and without.device["base_4bit"] > 15 * GIB
    assert q4lab.plan_qlora is plan_qlora


def _measured():
    files = sorted(RESULTS.glob("fsdp_cpu_*.json"))
    assert files, "run bench/bench_fsdp.py"
    return json.loads(files[-1].read_text())


@pytest.mark.parametrize("world", ["1", "2"])
def test_storage_parts_match_what_bench_fsdp_measured(world):
    """Two measured configurations (world 1 and 2): the 4-bit codes and statistics per rank are
    exact arithmetic (FSDP pads each shard to ceil(n / world)); adapters and AdamW state agree to
    the per-tensor padding and AdamW's step counters (< 1 %)."""
    run = _measured()
    c = run["config"]
    cfg = dict(hidden_size=c["hidden"], intermediate_size=c["hidden"] * 8 // 3,
               num_hidden_layers=c["layers"], num_attention_heads=8, num_key_value_heads=4,
               vocab_size=c["vocab"])
    plan = plan_qlora(cfg, world_size=int(world), device_memory=None, seq_len=c["seq"],
                      batch=c["batch"] // int(world), lora_rank=c["rank"], adapter_bytes=2)
    for rank in run["runs"][world]:
        m = rank["trained"]
        assert plan.device["base_4bit"] == m["base_4bit"]
        assert plan.device["statistics"] == m["statistics"]
        for part in ("adapters", "optimizer"):
            assert abs(plan.device[part] - m[part]) <= 0.01 * m[part], part


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="presets"):
        plan_qlora("llama-9b")
    with pytest.raises(ValueError, match="world_size"):
        plan_qlora(world_size=0)
