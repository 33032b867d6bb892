"""Parts the tests share (imported as ``helpers``: pytest puts tests/ on ``sys.path``; not a test
module): the small models, bitsandbytes' exact CPU path, and byte snapshots of a model.

- ``TinyLM`` / ``tiny``: a torch-only model shaped like a transformer (embedding, two blocks of
  attention q/k/v/o and MLP up/down, a layer below ``min_numel``, lm_head tied to the embedding).
- ``tiny_llama_config`` / ``tiny_llama``: a random transformers Llama (``LlamaConfig`` /
  ``LlamaForCausalLM``: 2 layers, hidden 64, MLP 128, 4 heads, 2 KV heads, vocab 256), the model of
  the transformers, PEFT and streaming tests. transformers is imported only when called.
- ``exact_bnb`` / ``bnb_load``: bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks every 4-bit
  weight on the first eval-mode forward (``nn/modules.py::Linear4bit.forward`` ->
  ``functional.py::_convert_weight_packed_for_cpu``) and rounds its absmax to bfloat16; these turn
  that off, so bnb computes dequantize + matmul as on other CPUs (tests/test_hf.py measures the
  effect).
- ``bnb_linear4bit``: a real ``bnb.nn.Linear4bit`` quantized by bitsandbytes itself
  (``Params4bit._quantize`` on the CPU) from an ``nn.Linear``.
- ``snapshot`` / ``assert_unchanged``: every tensor's bytes, for "bad input changes nothing".
"""
from __future__ import annotations

import torch
from torch import nn

import q4lab
from q4lab import Linear4bit, Q4Config, testing

CFG32 = dict(compute_dtype=torch.float32)
IDS = torch.arange(24).reshape(2, 12) % 97  # token ids for TinyLM (vocab 97)


class TinyLM(nn.Module):
    """Embedding -> two blocks (attn q/k/v/o, mlp up/down) -> lm_head tied to the embedding."""

    def __init__(self, vocab=97, d=64, hidden=160, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.attn = nn.ModuleDict({k: nn.Linear(d, d, bias=k != "o") for k in "qkvo"})
            blk.up, blk.down = nn.Linear(d, hidden), nn.Linear(hidden, d, bias=False)
            blk.gate = nn.Linear(d, 3)  # tiny: below min_numel
            self.blocks.append(blk)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.blocks:
            a = sum(blk.attn[k](h) for k in "qkv")
            h = h + blk.attn["o"](torch.tanh(a))
            h = h + blk.down(torch.relu(blk.up(h))) + blk.gate(h).sum(-1, keepdim=True)
        return self.lm_head(h)


def tiny(seed=0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw).eval()


def quantized_tiny(**cfg) -> TinyLM:
    """``tiny()`` quantized with float32 compute and the given ``Q4Config`` fields."""
    model = tiny()
    return q4lab.quantize_model(model, Q4Config(**{**CFG32, **cfg}), progress=False)


def linear_names(model, cls=nn.Linear) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def snapshot(model) -> dict:
    """Bytes of every tensor in the model, for 'unchanged' checks."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            out[n + ".absmax"] = m.quant_state.absmax.clone()
    return out


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        testing.assert_bytes_equal(before[k], after[k], k)


def tiny_llama_config(tie=True, **overrides):
    """The tiny Llama's ``LlamaConfig``; ``overrides`` replace any field."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie)
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed=0, dtype=torch.float32, tie=True, **overrides):
    """A random tiny Llama (``torch.manual_seed(seed)`` first), in ``dtype``, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie, **overrides)).to(dtype).eval()


def exact_bnb(model):
    """Turn off bnb's AVX512-BF16 repacking (module docstring) on every bnb 4-bit layer."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    assert n, "no bitsandbytes 4-bit layer in the model"
    return model


def bnb_linear4bit(lin: nn.Linear, quant_type="nf4", blocksize=64, double_quant=True):
    """A real bnb.nn.Linear4bit quantized by bitsandbytes itself (Params4bit._quantize on CPU),
    float32 compute, holding a copy of ``lin``'s weight and bias."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                     blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=quant_type, module=layer)._quantize("cpu")
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer


def bnb_load(directory, **kw):
    """A transformers + bitsandbytes model from ``directory`` on the CPU, repacking off."""
    from transformers import AutoModelForCausalLM

    return exact_bnb(AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu", **kw))
