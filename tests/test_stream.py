"""q4lab.quantize_checkpoint / ``python -m q4lab quantize``: streaming a safetensors checkpoint.

Claims: the output directory is byte for byte what ``quantize_model`` + ``save_pretrained`` give on
the model loaded in the checkpoint's dtype (every file, sharded or not); it loads in transformers +
bitsandbytes 0.50.2 with the q4lab model's logits; norms and embeddings are the source's bytes;
broken sources (missing or truncated shard, an index naming an absent tensor, a non-float weight
where a Linear is expected, NaN found mid-stream) give a clear error and leave no destination and
no temporary directory. Small checkpoints written here; the >= 1.5 GB memory measurement is
bench/bench_stream.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import q4lab
from q4lab.formats.shards import inventory, read_header
from q4lab.testing import assert_bytes_equal

transformers = pytest.importorskip("transformers")
from helpers import bnb_load, tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

CFG = q4lab.Q4Config(min_numel=0)  # QLoRA defaults (bf16 compute), every Linear but lm_head


def write_llama(directory, dtype=torch.bfloat16, shard="40KB", tie=True, seed=0):
    tiny_llama(seed, dtype, tie=tie).save_pretrained(directory, max_shard_size=shard)
    return directory


def digests(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.mark.parametrize("dtype, src_shard, out_shard", [
    (torch.bfloat16, "40KB", "5GB"), (torch.bfloat16, "40KB", "20KB"),
    (torch.float32, "5GB", "5GB")])
def test_stream_equals_quantize_model_then_save_pretrained(tmp_path, dtype, src_shard, out_shard):
    src = write_llama(tmp_path / "src", dtype=dtype, shard=src_shard)
    assert (len(inventory(src)[1]) > 1) == (src_shard == "40KB")
    if dtype == torch.float32:  # a bare config: no architectures, no generation_config.json
        (src / "generation_config.json").unlink()
        config = json.loads((src / "config.json").read_text())
        del config["architectures"]
        (src / "config.json").write_text(json.dumps(config))
    q4lab.quantize_checkpoint(src, tmp_path / "streamed", CFG, max_shard_size=out_shard,
                              progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(src))
    assert loaded.dtype == dtype
    q4lab.quantize_model(loaded, CFG, progress=False)
    q4lab.save_pretrained(loaded, tmp_path / "in_memory", max_shard_size=out_shard)
    streamed, in_memory = digests(tmp_path / "streamed"), digests(tmp_path / "in_memory")
    assert streamed == in_memory
    assert (len(streamed) > 4) == (out_shard == "20KB")  # shards + index when small shards


def test_stream_output_loads_in_transformers_bnb(source, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = q4lab.Q4Config(min_numel=0, compute_dtype=torch.float32)
    q4lab.quantize_checkpoint(source, tmp_path / "q", cfg, progress=False)
    theirs = bnb_load(tmp_path / "q")  # bnb's AVX512-BF16 repacking off
    ours = q4lab.quantize_model(AutoModelForCausalLM.from_pretrained(str(source)), cfg,
                                progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_bytes_equal(ours(ids).logits, theirs(ids).logits, "logits streamed, in bnb")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == 14


def test_norms_and_embeddings_are_copied_unchanged(source, tmp_path):
    q4lab.quantize_checkpoint(source, tmp_path / "q", CFG, progress=False)
    before, _ = inventory(source)
    after, _ = inventory(tmp_path / "q")
    kept = [k for k in before if "norm" in k or "embed" in k]
    assert len(kept) == 6
    for k in kept:
        a, b = before[k], after[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
            fa.seek(a.begin)
            fb.seek(b.begin)
            assert fa.read(a.nbytes) == fb.read(b.nbytes), k
    assert after["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert (tmp_path / "q" / "generation_config.json").read_bytes() == \
        (source / "generation_config.json").read_bytes()


def test_cli_writes_the_same_directory(source, tmp_path, capsys):
    q4lab.quantize_checkpoint(source, tmp_path / "api", q4lab.Q4Config(blocksize=128,
                                                                       min_numel=0),
                              progress=False)
    cmd = [sys.executable, "-m", "q4lab", "quantize", str(source), str(tmp_path / "cli"),
           "--blocksize", "128", "--min-numel", "0", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert digests(tmp_path / "cli") == digests(tmp_path / "api")
    from q4lab.__main__ import main

    assert main(cmd[3:]) == 1  # in process: the same entry point, now with an error
    assert "error:" in capsys.readouterr().err and leftovers(tmp_path) == []
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--quiet"]) == 1
    assert "is not a directory" in capsys.readouterr().err


def leftovers(parent) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def copy_source(source, tmp_path):
    import shutil

    return shutil.copytree(source, tmp_path / "src")


def _missing_shard(src):
    os.unlink(src / "model-00003-of-00006.safetensors")
    return "model-00003-of-00006.safetensors named by model.safetensors.index.json is missing"


def _truncated_shard(src):
    p = src / "model-00002-of-00006.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return "model-00002-of-00006.safetensors is truncated"


def _index_names_absent_tensor(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00006.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return "names 1 tensors that are not in the shard it gives, first 'model.layers.0.mlp.extra"


def _int_weight(src):
    from safetensors.torch import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = src / index["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = torch.ones(sd[key].shape, dtype=torch.int8)
    save_file(sd, str(shard), metadata={"format": "pt"})
    return "'model.layers.1.self_attn.o_proj.weight' .* is torch.int8 where the Linear layer"


def _nan_mid_stream(src):
    from safetensors.torch import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = src / index["weight_map"][key]
    sd = load_file(str(shard))
    sd[key][3, 40] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    return "layer 'model.layers.1.mlp.up_proj'.*(NaN|non-finite|Inf)"


@pytest.mark.parametrize("breakage", [_missing_shard, _truncated_shard,
                                      _index_names_absent_tensor, _int_weight, _nan_mid_stream])
def test_broken_sources_leave_no_destination(source, tmp_path, breakage):
    src = copy_source(source, tmp_path)
    message = breakage(src)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        q4lab.quantize_checkpoint(src, out, CFG, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_destination_is_kept_unless_overwrite(source, tmp_path):
    """Without overwrite a non-empty destination is refused; with it the model is written and the
    user's own files in the destination stay (docs/data-safety.md, W8)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        q4lab.quantize_checkpoint(source, out, CFG, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    q4lab.quantize_checkpoint(source, out, CFG, progress=False, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep" and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == [] and leftovers(out) == []


def test_refuses_tied_output_layer_and_quantized_sources(source, tmp_path):
    with pytest.raises(ValueError, match="tied to another tensor.*add 'lm_head' to skip_modules"):
        q4lab.quantize_checkpoint(source, tmp_path / "a", q4lab.Q4Config(skip_modules=(),
                                                                         min_numel=0),
                                  progress=False)
    q4lab.quantize_checkpoint(source, tmp_path / "q", CFG, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        q4lab.quantize_checkpoint(tmp_path / "q", tmp_path / "b", CFG, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_read_header_checks_the_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)},
              str(tmp_path / "x.safetensors"))
    entries, meta = read_header(tmp_path / "x.safetensors")
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {
        "a": (torch.float32, (3, 5)), "b": (torch.bfloat16, (7,))}
    (tmp_path / "y.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_header(tmp_path / "y.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "z.safetensors").write_bytes(data + b"\x00")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_header(tmp_path / "z.safetensors")
