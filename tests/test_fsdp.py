"""FSDP2 over q4lab's 4-bit layers: two real 2-rank gloo runs (``torchrun``, tests/fsdp_ranks.py)
checked here, plus the single-process parts (storage dtypes, errors). docs/distributed.md.

Each rank start costs seconds (torch + transformers imports), so the two launches are module-scoped
fixtures shared by the tests that read them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import q4lab
from q4lab import distributed as qdist
from q4lab.nn import Linear4bit

HERE = Path(__file__).resolve().parent
WORLD = 2


def launch(check: str, out: Path, device: str = "cpu") -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1",
           "TORCHELASTIC_ERROR_FILE": str(out / "error.json"), "Q4LAB_FSDP_DEVICE": device}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--standalone", str(HERE / "fsdp_ranks.py"), check, str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return launch("shard", tmp_path_factory.mktemp("shard"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return launch("train", out), out


CASES = ("plain", "lora_bf16_policy", "lora_bf16_storage_bf16_policy")


@pytest.mark.parametrize("case", CASES)
def test_fully_shard_splits_codes_and_statistics(sharded, case):
    """Plain fully_shard per decoder layer + root: each rank holds its half of the packed codes
    and of the statistics (odd byte counts split ceil/floor), not the whole base."""
    for rank, res in enumerate(sharded):
        r = res[case]
        before, after = r["before"], r["after"]
        for part in ("base_4bit", "statistics"):
            assert after[part] <= -(-before[part] // WORLD) + 16 * len(r["local"]), (rank, part)
            assert after[part] >= before[part] // WORLD - 16 * len(r["local"]), (rank, part)
        odd = [n for n, v in r["local"].items() if v[4] % WORLD]
        assert odd, "the model must have statistics whose byte count does not divide by 2"
        for name, (kind, packed, stats, full_packed, full_stats) in r["local"].items():
            assert kind == "DTensor", name
            assert packed == (-(-full_packed // WORLD) if rank == 0 else full_packed // WORLD)
            assert stats == (-(-full_stats // WORLD) if rank == 0 else full_stats // WORLD)


@pytest.mark.parametrize("case", CASES)
def test_gathered_bytes_equal_unsharded_bytes_under_every_policy(sharded, case):
    """Inside forward FSDP hands each layer codes and statistics byte-equal to the unsharded
    ones, also under MixedPrecisionPolicy(param_dtype=bf16) (which casts float parameters)."""
    for res in sharded:
        r = res[case]
        assert len(r["forward"]) == 14  # 7 linear layers x 2 decoder layers
        for name, (packed_diff, stats_diff, absmax_dtype, storage) in r["forward"].items():
            assert (packed_diff, stats_diff) == ("", ""), name
            assert absmax_dtype == "torch.uint8"  # nested codes stay codes
            assert storage == ("torch.bfloat16" if "storage" in case else "torch.uint8")
        assert all(v == ["", ""] for v in r["regathered"].values())


@pytest.mark.parametrize("case", CASES)
def test_no_gathered_bytes_survive_a_forward(sharded, case):
    """After forward + backward, and after a one-row decode through the fused kernel and its
    cached arguments, no layer references storage beyond its own shard."""
    for res in sharded:
        r = res[case]
        assert all(r["fused"]), "the decode must have taken the fused path"
        assert set(r["held_after_train"].values()) == {0}
        assert set(r["held_after_decode"].values()) == {0}


def test_an_empty_shard_and_a_wrong_mesh(sharded):
    """A 1x2 layer packs into 1 byte: rank 1's shard is empty and forward/backward still work;
    a 2-D mesh is refused with the mesh to build."""
    assert [r["empty_shard_local_bytes"] for r in sharded] == [1, 0]
    assert all(r["empty_shard_grad_ok"] for r in sharded)
    assert all("does not match the 2 processes" in r["mesh_error"] for r in sharded)


def test_a_policy_that_casts_float_storage_is_refused(sharded):
    for res in sharded:
        assert "MixedPrecisionPolicy" in res["cast_storage_error"]
        assert "quant_storage=torch.uint8" in res["cast_storage_error"]


def test_two_ranks_train_as_one_process_on_the_whole_batch(trained):
    """Each rank on its own half of the batch, gradients averaged by FSDP's reduce-scatter,
    against one process on the whole batch. Only float32 summation order differs (the batch
    mean is split in two and the halves' gradients summed across ranks): we allow 1e-5 relative
    on the loss (measured: equal or 1 ulp, ~1e-7) and 1e-5 absolute on the adapter weights
    (measured <= 6e-7; each AdamW step moves a weight by ~lr = 1e-2)."""
    ranks, _ = trained
    for res in ranks:
        single, sharded = res["single"], res["sharded"]
        assert len(single) == len(sharded) == 4
        for a, b in zip(single, sharded):
            assert abs(a - b) <= 1e-5 * abs(a), (single, sharded)
        assert res["adapter_names_match"]
        assert max(res["adapter_max_abs_diff"].values()) <= 1e-5
        assert max(res["adapter_max_abs_diff"].values()) > 0 or single == sharded
        assert all(v == ["", ""] for v in res["base_unchanged"].values())
    assert ranks[0]["sharded"] == ranks[1]["sharded"]


def test_resume_from_a_sharded_checkpoint_continues_with_the_same_losses(trained):
    ranks, _ = trained
    for res in ranks:
        assert res["step"] == 2
        assert res["resumed"] == res["sharded"][2:]  # bitwise: the same operations in order


def test_per_rank_memory_after_training(trained):
    ranks, _ = trained
    for res in ranks:
        m = res["memory"]
        assert m["world"] == WORLD and m["optimizer"] > 0 and m["adapters"] > 0
        # AdamW keeps exp_avg and exp_avg_sq per adapter element (+ a step scalar per tensor)
        assert 1.9 * m["adapters"] <= m["optimizer"] <= 2 * m["adapters"] + 4 * 28


def test_consolidated_directories_load_in_q4lab_transformers_and_peft(trained):
    _, out = trained
    model_dir, adapter_dir = out / "model4bit", out / "adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    mine = q4lab.from_pretrained(model_dir)
    q4lab.load_adapters(mine, adapter_dir)
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                       adapter_dir)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mine(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ---- single process --------------------------------------------------------------------------
def test_sharding_without_a_process_group_says_how_to_start():
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        qdist.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_memory_by_part_of_an_unsharded_model_counts_real_bytes():
    layer = Linear4bit.from_linear(torch.nn.Linear(72, 40, bias=False))
    model = q4lab.add_lora(torch.nn.Sequential(layer), r=2, target_modules=("0",))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    m = qdist.memory_by_part(model, opt)
    assert m["base_4bit"] == 72 * 40 // 2
    assert m["statistics"] == 45 + 4 + 4  # 45 uint8 absmax codes, 1 nested absmax, offset
    assert m["adapters"] == 4 * 2 * (72 + 40)
    assert m["optimizer"] == 0  # no step yet
    model(torch.randn(3, 72)).sum().backward()
    opt.step()
    assert qdist.memory_by_part(model, opt)["optimizer"] == 2 * m["adapters"] + 2 * 4


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (NCCL)")
def test_nccl_on_gpus_shards_and_gathers_the_same_bytes(tmp_path):
    """The sharding checks on 2 GPUs with NCCL: halves per rank, byte-equal gathers under the
    bf16 policy, no gathered bytes held after forward."""
    for res in launch("shard", tmp_path, device="cuda"):
        for case in CASES:
            r = res[case]
            assert all(v[:2] == ["", ""] for v in r["forward"].values()), case
            assert r["after"]["base_4bit"] <= r["before"]["base_4bit"] // WORLD + 16 * 14
            assert set(r["held_after_train"].values()) == {0}
