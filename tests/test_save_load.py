"""q4lab.save / q4lab.load (safetensors in bitsandbytes' layout) on small synthetic models and a
random transformers Llama: a round trip reproduces packed bytes and layer outputs exactly, and a
corrupted or truncated file raises a clear error and leaves the model unchanged. Models:
tests/helpers.py.
"""
import json

import pytest
import torch
from helpers import (CFG32, IDS, assert_unchanged, linear_names, quantized_tiny, snapshot, tiny,
                     tiny_llama_config)
from safetensors import safe_open
from safetensors.torch import save_file

import q4lab
from q4lab import Linear4bit, Q4Config, testing


# ---- save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(quant_type="fp4", blocksize=128, double_quant=False)])
def test_save_load_round_trip_into_fresh_model(tmp_path, cfg):
    model = quantized_tiny(**cfg)
    q4lab.save(model, tmp_path / "m.safetensors")
    fresh = q4lab.load(tiny(seed=1), tmp_path / "m.safetensors")
    assert linear_names(fresh, Linear4bit) == linear_names(model, Linear4bit)
    for n in linear_names(model, Linear4bit):
        a, b = model.get_submodule(n), fresh.get_submodule(n)
        testing.assert_bytes_equal(a.packed, b.packed, n)
        testing.assert_states_equal(a.quant_state, b.quant_state, n)
        assert b.compute_dtype == a.compute_dtype
    assert fresh.lm_head.weight is fresh.embed.weight  # tie survives, stored once
    with torch.no_grad():
        testing.assert_bytes_equal(model(IDS), fresh(IDS), "logits")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.up.weight.quant_state.bitsandbytes__" + model.blocks[0].up.quant_state \
        .quant_type in keys and "lm_head.weight" not in keys


def test_load_into_quantized_model_updates_in_place(tmp_path):
    src, dst = quantized_tiny(), q4lab.quantize_model(tiny(seed=5), Q4Config(**CFG32),
                                                      progress=False)
    q4lab.save(src, tmp_path / "m.safetensors")
    layer = dst.blocks[0].up
    q4lab.load(dst, tmp_path / "m.safetensors")
    assert dst.blocks[0].up is layer
    testing.assert_bytes_equal(src.blocks[0].up.packed, layer.packed, "packed")


def _rewrite(path, out, edit):
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    edit(tensors)
    save_file(tensors, str(out), metadata=meta)


K = "blocks.1.up.weight"


def _bad_json(t):
    t[K + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4", '),
                                                           dtype=torch.uint8)


def _bad_shape(t):
    meta = json.loads(bytes(t[K + ".quant_state.bitsandbytes__nf4"].numpy()))
    meta["shape"] = [64, 160]
    t[K + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                           dtype=torch.uint8)


CORRUPTIONS = {
    "bad JSON": (_bad_json, "JSON"),
    "wrong absmax dtype": (lambda t: t.update({K + ".absmax": t[K + ".absmax"].float()}), "dtype"),
    "missing nested_absmax": (lambda t: t.pop(K + ".nested_absmax"), "nested_absmax"),
    "packed too short": (lambda t: t.update({K: t[K][:-1]}), "shape"),
    "stored shape mismatch": (_bad_shape, "shape"),
    "missing plain key": (lambda t: t.pop("blocks.0.gate.bias"), "missing keys"),
    "missing 4-bit layer bias": (lambda t: t.pop("blocks.0.attn.q.bias"), "bias"),
    "unexpected key": (lambda t: t.update({"extra.thing": torch.zeros(2)}), "unexpected"),
    "wrong embedding shape": (lambda t: t.update({"embed.weight": torch.zeros(5, 64)}), "embed"),
    "altered quant_map": (lambda t: t[K + ".quant_map"].__setitem__(3, 0.5), "quant_map"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_load_rejects_corrupted_files_and_leaves_model_unchanged(tmp_path, name):
    edit, match = CORRUPTIONS[name]
    q4lab.save(quantized_tiny(), tmp_path / "m.safetensors")
    _rewrite(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", edit)
    for target in (tiny(seed=3), quantized_tiny(quant_type="fp4")):
        before = snapshot(target)
        with pytest.raises(ValueError, match=match):
            q4lab.load(target, tmp_path / "bad.safetensors")
        assert_unchanged(target, before)


def test_load_rejects_truncated_file(tmp_path):
    q4lab.save(quantized_tiny(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    target = tiny(seed=3)
    before = snapshot(target)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        q4lab.load(target, tmp_path / "t.safetensors")
    assert_unchanged(target, before)


def test_transformers_llama_with_tied_lm_head_quantized_generates_and_round_trips(tmp_path):
    """A randomly initialised transformers Llama (tied lm_head, GQA) with every Linear quantized:
    generate() runs, and save -> load into a fresh model reproduces the logits byte for byte."""
    tf = pytest.importorskip("transformers")
    cfg = tiny_llama_config(vocab_size=320, intermediate_size=176, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    q4lab.quantize_model(model, Q4Config(skip_modules=(), min_numel=0, **CFG32), progress=False)
    assert isinstance(model.lm_head, Linear4bit) and len(linear_names(model, Linear4bit)) == 15
    ids = torch.randint(0, 320, (1, 7))
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 11)
    q4lab.save(model, tmp_path / "llama.safetensors")
    fresh = q4lab.load(tf.LlamaForCausalLM(cfg).eval(), tmp_path / "llama.safetensors")
    with torch.no_grad():
        testing.assert_bytes_equal(model(ids).logits, fresh(ids).logits, "logits")
