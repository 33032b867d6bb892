"""Packed 4-bit bytes stored as another dtype (bitsandbytes' ``quant_storage``, what FSDP-QLoRA
checkpoints use): ``Linear4bit`` with bf16/fp16/fp32 storage, and directories written by
transformers + bitsandbytes with ``bnb_4bit_quant_storage=bfloat16`` (docs/distributed.md)."""
from __future__ import annotations

import json

import pytest
import torch

import q4lab
from q4lab import storage
from q4lab.nn import Linear4bit
from q4lab.testing import assert_bytes_equal

STORAGES = (torch.bfloat16, torch.float16, torch.float32, torch.int32)


@pytest.mark.parametrize("dtype", STORAGES)
@pytest.mark.parametrize("shape", [(40, 72), (3, 7)])  # 1440 and 11 packed bytes
def test_linear4bit_with_another_storage_dtype_computes_the_same_bytes(dtype, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    plain = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    other = Linear4bit.from_linear(linear, compute_dtype=torch.float32, quant_storage=dtype)
    size = dtype.itemsize
    nbytes = -(-shape[0] * shape[1] // 2)
    assert other.packed.dtype == dtype and other.quant_storage == dtype
    assert other.packed.numel() == -(-nbytes // size)
    assert_bytes_equal(other.packed_bytes, plain.packed, "codes")
    x = torch.randn(5, shape[1])
    for rows in (x, x[:1]):
        with torch.no_grad():
            assert_bytes_equal(other(rows), plain(rows), f"forward {rows.shape}")
    other.half().float()  # .half() moves, never converts, the stored bytes
    assert other.packed.dtype == dtype
    assert_bytes_equal(other.packed_bytes, plain.packed, "codes after .half()")
    sd = q4lab.to_bnb_state_dict(other)
    assert sd["weight"].dtype == dtype and sd["weight"].shape == (other.packed.numel(), 1)
    back = q4lab.formats.bnb.from_bnb_linear(q4lab.formats.bnb.to_bnb_linear(other)) \
        if dtype != torch.int32 else other
    assert_bytes_equal(back.packed_bytes, plain.packed, "via bitsandbytes")


def test_wrong_element_count_is_refused_with_the_count_needed():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(72, 40))
    wrong = torch.zeros(700, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="720 bfloat16 values"):
        Linear4bit(72, 40, wrong, layer.quant_state)
    with pytest.raises(TypeError, match="quant_storage"):
        storage.storage_dtype(torch.complex64)


@pytest.fixture(scope="module")
def bnb_bf16_dir(tmp_path_factory):
    """A tiny Llama quantized and saved by transformers + bitsandbytes with
    bnb_4bit_quant_storage=bfloat16 (packed bytes as a bf16 tensor of shape (n/4, 1))."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, \
        LlamaForCausalLM

    root = tmp_path_factory.mktemp("bnb_bf16")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "fp32")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                            bnb_4bit_quant_storage=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(str(root / "fp32"), quantization_config=qc,
                                         device_map="cpu").save_pretrained(root / "bnb")
    return root / "bnb"


def _bnb_model(directory):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def test_from_pretrained_opens_a_bf16_storage_directory_written_by_transformers(bnb_bf16_dir,
                                                                                 tmp_path):
    from safetensors.torch import load_file

    stored = load_file(str(bnb_bf16_dir / "model.safetensors"))
    config = json.loads((bnb_bf16_dir / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    model = q4lab.from_pretrained(bnb_bf16_dir, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    for name, layer in layers.items():
        raw = stored[f"{name}.weight"]
        assert raw.dtype == torch.bfloat16 and raw.shape[1] == 1
        assert layer.quant_storage == torch.bfloat16
        assert_bytes_equal(layer.packed_bytes, raw.reshape(-1).view(torch.uint8), name)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    theirs = _bnb_model(bnb_bf16_dir)
    for layer in layers.values():   # bnb's exact path is dequantize + matmul: compare that one
        layer.matmul_path = "dequantize"  # (24 rows may take the fused kernel: q4lab/_crossover.py)
    with torch.no_grad():
        assert_bytes_equal(model(ids).logits, theirs(ids).logits, "logits")
    # and back: q4lab writes the same storage, which transformers + bitsandbytes load
    q4lab.save_pretrained(model, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    with torch.no_grad():
        assert_bytes_equal(_bnb_model(tmp_path / "again")(ids).logits, theirs(ids).logits,
                           "logits of q4lab's rewrite")
