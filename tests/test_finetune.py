"""``torchrun --nproc-per-node 2 -m q4lab finetune`` (q4lab/finetune.py) on a tiny Llama directory
with a word-level tokenizer built here, and its error without torchrun. docs/distributed.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import q4lab

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"the {w} of q4lab shards a frozen base across ranks" for w in
                ("codes", "scales", "layers", "adapters", "steps")) * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("finetune")
    words = sorted(set(TEXT.split()))
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"<unk>": 0},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "m")
    (root / "train.txt").write_text(TEXT)
    return root


def run(args, env_extra=None, torchrun=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m"] if torchrun else [sys.executable, "-m"]
    return subprocess.run([*launcher, "q4lab", "finetune", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_finetune_without_torchrun_says_how_to_start(model_dir):
    out = run([model_dir / "m", model_dir / "train.txt", model_dir / "none"], torchrun=False)
    assert out.returncode == 1
    assert "torchrun --nproc-per-node N" in out.stderr and "Traceback" not in out.stderr


def test_finetune_on_two_processes_writes_checkpoint_and_adapter(model_dir):
    out_dir = model_dir / "out"
    done = run([model_dir / "m", model_dir / "train.txt", out_dir, "--steps", "4", "--batch",
                "4", "--seq-len", "16", "--lr", "1e-2", "--checkpoint-every", "2"])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out_dir / "losses.json").read_text())
    assert result["start"] == 0 and len(result["losses"]) == 4
    assert result["losses"][-1] < result["losses"][0]  # lr 1e-2 on a repetitive text
    assert (out_dir / "checkpoint" / ".metadata").is_file()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir / "m"))
    q4lab.quantize_model(base, q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
    q4lab.load_adapters(base, out_dir / "adapter")
    quantized = [m for m in base.modules() if isinstance(m, q4lab.Linear4bit)]
    assert len(q4lab.lora.lora_layers(base)) == len(quantized) == 10  # k/v_proj (32x64) too small
