"""Q4Config and quantize_model on small synthetic models (fast, no downloads).

Checks against the source of truth: every replaced layer holds exactly the bytes that
``q4lab.quantize_4bit`` gives for the original weight (compared byte for byte), the right layers
are replaced (skip_modules, min_numel, tied and shared layers), full-precision weights are freed,
and a bad layer raises a clear error before anything changes. Models: tests/helpers.py.
"""
import gc
import weakref

import pytest
import torch
from helpers import CFG32, IDS, linear_names, quantized_tiny, tiny
from torch import nn

import q4lab
from q4lab import Linear4bit, Q4Config, testing


# ---- Q4Config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    (dict(quant_type="nf3"), ValueError, "quant_type"),
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(compute_dtype=torch.float64), TypeError, "compute_dtype"),
    (dict(skip_modules=("lm_head", 3)), TypeError, "skip_modules"),
    (dict(min_numel=-1), ValueError, "min_numel"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(double_quant="yes"), TypeError, "double_quant"),
])
def test_config_rejects_bad_values(kw, err, match):
    with pytest.raises(err, match=match):
        Q4Config(**kw)


def test_config_accepts_dtype_names_and_quantize_model_overrides():
    assert Q4Config(compute_dtype="float16").compute_dtype == torch.float16
    assert Q4Config(compute_dtype="torch.bfloat16").compute_dtype == torch.bfloat16
    model = q4lab.quantize_model(tiny(), quant_type="fp4", blocksize=32, progress=False)
    assert model.blocks[0].up.quant_state.quant_type == "fp4"
    assert model.blocks[0].up.quant_state.blocksize == 32
    with pytest.raises(TypeError, match="unknown options"):
        q4lab.quantize_model(tiny(), block_size=32)


def test_config_defaults_are_qlora():
    c = Q4Config()
    assert (c.quant_type, c.blocksize, c.double_quant, c.compute_dtype) == \
        ("nf4", 64, True, torch.bfloat16)
    assert c.skips("lm_head") and c.skips("model.lm_head") and not c.skips("model.lm_headx")
    assert Q4Config(skip_modules="attn.o").skips("blocks.1.attn.o")
    assert not Q4Config(skip_modules="attn.o").skips("blocks.1.attn.q")


# ---- quantize_model -----------------------------------------------------------------------------
def test_quantize_model_replaces_the_right_layers_with_exact_bytes():
    model = tiny(tie=False)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    q4lab.quantize_model(model, Q4Config(skip_modules=("lm_head", "attn.o"), **CFG32),
                         progress=False)
    quantized = linear_names(model, Linear4bit)
    expected = sorted(n for n in originals if not n.endswith(("lm_head", "attn.o", "gate")))
    assert quantized == expected
    assert sorted(linear_names(model)) == sorted(set(originals) - set(expected))
    for name in quantized:
        layer = model.get_submodule(name)
        packed, state = q4lab.quantize_4bit(originals[name], 64, "nf4", True)
        testing.assert_bytes_equal(packed, layer.packed, f"{name} packed")
        testing.assert_states_equal(state, layer.quant_state, name)
        assert layer.compute_dtype == torch.float32


def test_quantize_model_output_equals_layerwise_linear4bit():
    model, ref = tiny(), tiny()
    q4lab.quantize_model(model, Q4Config(quant_type="fp4", blocksize=32, double_quant=False,
                                         **CFG32), progress=False)
    for name in linear_names(model, Linear4bit):
        setattr_path(ref, name, Linear4bit.from_linear(ref.get_submodule(name), 32, "fp4", False,
                                                       torch.float32))
    with torch.no_grad():
        testing.assert_bytes_equal(ref(IDS), model(IDS), "logits")


def setattr_path(model, name, module):
    q4lab.nn.set_submodule(model, name, module)


def test_quantize_model_is_idempotent_and_returns_model():
    model = tiny()
    assert q4lab.quantize_model(model, progress=False) is model
    packed = {n: model.get_submodule(n).packed for n in linear_names(model, Linear4bit)}
    q4lab.quantize_model(model, Q4Config(quant_type="fp4", min_numel=0), progress=False)
    for n, p in packed.items():
        assert model.get_submodule(n).packed is p, n
    assert "blocks.0.gate" in linear_names(model, Linear4bit)  # min_numel=0 took the tiny one


def test_tied_lm_head_quantized_embedding_kept():
    model = tiny()
    emb = model.embed.weight.detach().clone()
    q4lab.quantize_model(model, Q4Config(skip_modules=(), **CFG32), progress=False)
    assert isinstance(model.lm_head, Linear4bit)
    testing.assert_bytes_equal(emb, model.embed.weight, "embedding")
    packed, _ = q4lab.quantize_4bit(emb, 64, "nf4", True)
    testing.assert_bytes_equal(packed, model.lm_head.packed, "lm_head")
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_shared_linear_weight_is_quantized_once():
    a, b = nn.Linear(64, 128), nn.Linear(64, 128)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), b)
    q4lab.quantize_model(model, progress=False)
    assert model[0].packed is model[4].packed
    assert model[0].quant_state is model[4].quant_state


def test_full_precision_weights_are_freed():
    model = tiny(tie=False)
    refs = {n: weakref.ref(model.get_submodule(n).weight) for n in linear_names(model)}
    q4lab.quantize_model(model, progress=False)
    gc.collect()
    quantized = set(linear_names(model, Linear4bit))
    alive = sorted(n for n in quantized if refs[n]() is not None)
    assert quantized and not alive, f"weights still referenced: {alive}"


@pytest.mark.parametrize("poison, err, match", [
    ("float64", TypeError, "float64"), ("nan", ValueError, "NaN")])
def test_bad_layer_is_reported_before_anything_changes(poison, err, match):
    model = tiny(tie=False)
    if poison == "float64":
        model.blocks[1].up = model.blocks[1].up.double()
    else:
        with torch.no_grad():
            model.blocks[1].up.weight[3, 5] = float("nan")
    names = linear_names(model)
    with pytest.raises(err, match=match) as info:
        q4lab.quantize_model(model, progress=False)
    assert "blocks.1.up" in str(info.value)
    assert linear_names(model) == names and not linear_names(model, Linear4bit)


def test_quantize_model_rejects_non_config_and_bare_linear():
    with pytest.raises(TypeError, match="Q4Config"):
        q4lab.quantize_model(tiny(), {"quant_type": "nf4"})
    with pytest.raises(TypeError, match="from_linear"):
        q4lab.quantize_model(nn.Linear(128, 128))


@pytest.mark.cuda
def test_quantize_model_on_cuda_matches_cpu_bytes(tmp_path):
    cpu, gpu = quantized_tiny(), q4lab.quantize_model(tiny().cuda(), Q4Config(**CFG32),
                                                      progress=False)
    for n in linear_names(cpu, Linear4bit):
        a, b = cpu.get_submodule(n), gpu.get_submodule(n)
        assert b.packed.is_cuda and b.quant_state.absmax.is_cuda
        testing.assert_bytes_equal(a.packed, b.packed, n)
        testing.assert_states_equal(a.quant_state.numpy(), b.quant_state.numpy(), n)
    with torch.no_grad():
        assert torch.isfinite(gpu(IDS.cuda())).all()
    q4lab.save(gpu, tmp_path / "g.safetensors")
    back = q4lab.load(tiny(seed=4).cuda(), tmp_path / "g.safetensors")
    testing.assert_bytes_equal(gpu.blocks[1].down.packed, back.blocks[1].down.packed, "reload")
    assert back.blocks[1].down.packed.is_cuda


def test_shared_linear_is_quantized_once_under_every_name():
    model = torch.nn.Sequential()
    model.a = torch.nn.Linear(128, 128)
    model.b = model.a
    q4lab.quantize_model(model, progress=False)
    assert isinstance(model.a, q4lab.Linear4bit) and model.b is model.a
