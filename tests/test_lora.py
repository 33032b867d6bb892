"""QLoRA adapters (q4lab.lora): exactness of the adapter math and its gradients, training a real
LLM (SmolLM2-135M-Instruct) on a frozen 4-bit base, adapter files, merge/unmerge, memory arithmetic.

Sources: LoRA (arXiv 2106.09685) §4.1, QLoRA (arXiv 2305.14314) §3 eq. (5) and §1 (the 780 GB /
48 GB figures for LLaMA-65B), PEFT ``tuners/lora/layer.py`` (init, key names). Equality claims are
byte comparisons (``q4lab.testing``); tolerances appear only where the arithmetic differs from the
reference (float64 gradients, merged weights: bounds derived in the tests; merged outputs).
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q4lab
from q4lab.lora import LoRALinear4bit, lora_layers, read_adapters, trainable_parameters
from q4lab.lora_memory import llama_param_counts
from q4lab.testing import assert_bytes_equal, byte_mismatch

F32 = torch.float32


# ---- small models --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=64, kv=32, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(kv, d, bias=False)

    def forward(self, x):
        return x + self.o_proj(torch.tanh(self.q_proj(x))[..., :self.v_proj.out_features]
                               * self.v_proj(x))


class Tiny(nn.Module):
    def __init__(self, n=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(Block(**kw) for _ in range(n))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def quantized_tiny(seed=0, compute_dtype=F32, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = q4lab.Q4Config(compute_dtype=compute_dtype, min_numel=0)
    return q4lab.quantize_model(Tiny(**kw), cfg, progress=False)


def base_snapshot(model) -> dict:
    """Copies of every stored byte of the 4-bit base: packed codes and the whole quant state, by
    layer name (a LoRA wrapper's ``.base`` counts as the layer it wraps)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, q4lab.Linear4bit):
            s = m.quant_state
            parts = [m.packed, s.absmax] + ([s.state2.absmax, s.offset] if s.nested else [])
            out[name.removesuffix(".base")] = [t.detach().clone() for t in parts]
    return out


def assert_snapshot_equal(before: dict, model) -> None:
    after = base_snapshot(model)
    assert list(after) == list(before)
    for name, tensors in before.items():
        for part, (a, b) in enumerate(zip(tensors, after[name])):
            assert_bytes_equal(a, b, f"{name} part {part}")


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g).to(w.dtype) * 0.05)


# ---- adapter forward and gradients -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 96), (2, 7, 96)])
@pytest.mark.parametrize("quant_type,blocksize,bias", [("nf4", 64, True), ("fp4", 128, False)])
def test_gradients_equal_dense_reference_bytes(dtype, shape, quant_type, blocksize, bias):
    """Reference: a plain nn.Linear holding the dequantized weight plus the same LoRA formula on
    plain tensors. Forward and backward run the same ops in the same order (F.linear forward;
    grad_x = grad_out @ W; the two branches' grad_x summed by autograd in the same order), so the
    output and the gradients w.r.t. x, A and B must be equal byte for byte."""
    torch.manual_seed(3)
    lin = nn.Linear(96, 80, bias=bias)
    base = q4lab.Linear4bit.from_linear(lin, blocksize, quant_type, True, dtype)
    assert_grads_equal_dense_reference(base, shape, dtype)


def assert_grads_equal_dense_reference(base, shape, dtype):
    base.matmul_path = "dequantize"  # the reference is dequantize + F.linear; inputs of <= 8 rows
    layer = LoRALinear4bit(base, r=4, alpha=8)  # would otherwise take the fused matmul
    randomize_B(layer)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    bias = base.bias is not None
    ref = nn.Linear(base.in_features, base.out_features, bias=bias, dtype=dtype)
    ref.requires_grad_(False)
    ref.weight.copy_(base.dequantized_weight())
    if bias:
        ref.bias.copy_(base.bias)
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = ref(xr) + F.linear(F.linear(xr, A), B) * layer.scaling
    yr.backward(g)
    for what, e, got in [("y", yr, y), ("dx", xr.grad, x.grad), ("dA", A.grad,
                         layer.lora_A.weight.grad), ("dB", B.grad, layer.lora_B.weight.grad)]:
        assert_bytes_equal(e, got, what)
    assert base.packed.grad is None and not base.packed.requires_grad
    assert base.bias is None or base.bias.grad is None


def test_input_gradient_within_float32_rounding_of_exact():
    """Against float64 math on the same dequantized weight: |dx32 - dx64| <= gamma_n * (|g| @ |W|)
    + ... with gamma_n = n u / (1 - n u), u = 2^-24, n = the longest dot product (the standard
    forward error bound of a float32 dot product, Higham, Accuracy and Stability, Thm 3.1),
    summed over the base and adapter branches."""
    torch.manual_seed(4)
    base = q4lab.Linear4bit.from_linear(nn.Linear(320, 256, bias=False))
    layer = LoRALinear4bit(base, r=8, alpha=16)
    randomize_B(layer)
    x = torch.randn(6, 320, requires_grad=True)
    g = torch.randn(6, 256)
    layer(x).backward(g)
    W = base.dequantized_weight().double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    dx = g.double() @ W + layer.scaling * ((g.double() @ B) @ A)
    u, n = 2.0**-24, 256 + 8 + 2
    bound = (n * u / (1 - n * u)) * (g.double().abs() @ W.abs()
                                     + layer.scaling * (g.double().abs() @ B.abs()) @ A.abs())
    err = (x.grad.double() - dx).abs()
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3g}"


def test_b_zero_init_is_bit_identical_and_adapters_use_compute_dtype():
    for dtype in (F32, torch.bfloat16):
        model = quantized_tiny(compute_dtype=dtype)
        x = torch.randn(3, 5, 64)
        with torch.no_grad():
            y0 = model(x)
        q4lab.add_lora(model, r=4, alpha=8)
        with torch.no_grad():
            y1 = model(x)
        assert_bytes_equal(y0, y1, f"B=0 output, compute {dtype}")
        for layer in lora_layers(model).values():
            assert layer.lora_A.weight.dtype == dtype and layer.lora_B.weight.dtype == dtype
            assert not bool(layer.lora_B.weight.any())
            bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)): U(-b, b)
            a = layer.lora_A.weight.detach().float()
            assert 0 < float(a.abs().max()) <= bound and float(a.std()) > bound / 4


def test_add_lora_wraps_only_targets_and_freezes_everything_else():
    model = quantized_tiny()
    out = q4lab.add_lora(model, r=4, alpha=8, target_modules=("q_proj", "layers.1.o_proj"))
    assert out is model
    assert sorted(lora_layers(model)) == ["layers.0.q_proj", "layers.1.o_proj", "layers.1.q_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in lora_layers(model) for ab in "AB"}
    counts = trainable_parameters(model)
    assert counts["trainable"] == sum(4 * (m.in_features + m.out_features)
                                      for m in lora_layers(model).values())


def test_add_lora_on_a_bare_layer_returns_the_wrapper():
    base = q4lab.Linear4bit.from_linear(nn.Linear(64, 48))
    layer = q4lab.add_lora(base, r=2, alpha=4)
    assert isinstance(layer, LoRALinear4bit) and layer.base is base
    assert layer.scaling == 2.0 and tuple(layer.lora_A.weight.shape) == (2, 64)
    assert not base.bias.requires_grad


def test_dropout_acts_on_the_adapter_input_only():
    model = quantized_tiny()
    q4lab.add_lora(model, r=4, alpha=8, dropout=0.5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        base_out = model(x)  # B = 0: dropout cannot change anything yet
        model.train()
        assert_bytes_equal(base_out, model(x), "train mode, B=0")
        randomize_B(model)
        torch.manual_seed(0)
        train_a, train_b = model(x), model(x)
        model.eval()
        eval_a, eval_b = model(x), model(x)
    assert byte_mismatch(train_a, train_b) is not None, "dropout had no effect in train mode"
    assert_bytes_equal(eval_a, eval_b, "eval mode is deterministic")


# ---- bad configurations ----------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "rank r=0"), (dict(r=-2), "rank r=-2"), (dict(r=2.5), "rank"),
    (dict(r=True), "rank"), (dict(alpha=0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(target_modules=()), "target_modules"), (dict(target_modules=[""]), "target_modules"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        q4lab.add_lora(quantized_tiny(), **kw)


def test_no_match_lists_what_exists():
    with pytest.raises(ValueError, match=r"matched no q4lab.Linear4bit.*o_proj.*q_proj.*v_proj"):
        q4lab.add_lora(quantized_tiny(), target_modules=("k_proj",))
    with pytest.raises(ValueError, match="not 4-bit.*quantize"):
        q4lab.add_lora(Tiny(), target_modules=("q_proj",))
    model = q4lab.add_lora(quantized_tiny(), target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"already wrapped with LoRA: \['q_proj'\]"):
        q4lab.add_lora(model, target_modules=("q_proj",))


# ---- merge / unmerge -----------------------------------------------------------------------
def test_merge_gives_dense_linear_and_unmerge_restores_exactly():
    model = quantized_tiny()
    q4lab.add_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    randomize_B(model)
    before = base_snapshot(model)
    wrappers = dict(lora_layers(model))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_lora = model(x)
        exact = {n: (m.base.dequantized_weight().double(), m.scaling * m.lora_B.weight.double()
                     @ m.lora_A.weight.double(), m.scaling * m.lora_B.weight.double().abs()
                     @ m.lora_A.weight.double().abs()) for n, m in wrappers.items()}
    q4lab.merge_lora(model)
    assert not lora_layers(model)
    for name, (w, delta, delta_abs) in exact.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and not merged.weight.requires_grad
        # float32: a length-r dot product (gamma_r), one scaling multiply, one add: to first
        # order |W' - (W + sBA)| <= (r + 2) u (|W| + s|B||A|), u = 2^-24 (Higham, Thm 3.1)
        bound = (4 + 2) * 2.0**-24 * (w.abs() + delta_abs)
        err = (merged.weight.double() - (w + delta)).abs()
        assert bool((err <= bound).all()), f"{name}: max err/bound {float((err / bound).max())}"
    with torch.no_grad():
        y_merged = model(x)
    torch.testing.assert_close(y_merged, y_lora, rtol=1e-5, atol=1e-5)  # summation order only
    q4lab.unmerge_lora(model)
    assert lora_layers(model) == wrappers  # the very same modules are back
    assert_snapshot_equal(before, model)
    with torch.no_grad():
        assert_bytes_equal(y_lora, model(x), "output after unmerge")


def test_merge_requantize_is_lossy_and_warns():
    model = q4lab.add_lora(quantized_tiny(), r=4, alpha=8)
    randomize_B(model)
    with pytest.warns(RuntimeWarning, match="lossy"):
        q4lab.merge_lora(model, requantize=True)
    assert isinstance(model.layers[0].q_proj, q4lab.Linear4bit)
    q4lab.unmerge_lora(model)
    assert isinstance(model.layers[0].q_proj, LoRALinear4bit)
    with pytest.raises(ValueError, match="no merged LoRA layers"):
        q4lab.unmerge_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        q4lab.merge_lora(quantized_tiny())


# ---- adapter files -------------------------------------------------------------------------
def test_save_load_roundtrip_keys_and_metadata(tmp_path):
    model = q4lab.add_lora(quantized_tiny(), r=4, alpha=8, target_modules=("v_proj",))
    randomize_B(model)
    path = tmp_path / "adapters.safetensors"
    q4lab.save_adapters(model, path)
    modules, meta = read_adapters(path)
    assert meta["r"] == "4" and float(meta["alpha"]) == 8.0
    assert json.loads(meta["target_modules"]) == ["v_proj"]
    assert sorted(modules) == ["layers.0.v_proj", "layers.1.v_proj"]
    fresh = quantized_tiny()  # same seed: same base bytes, no adapters yet
    q4lab.load_adapters(fresh, path)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_bytes_equal(model(x), fresh(x), "outputs after load")


def test_adapter_file_errors(tmp_path):
    model = q4lab.add_lora(quantized_tiny(), r=4, alpha=8)
    good = tmp_path / "good.safetensors"
    q4lab.save_adapters(model, good)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        q4lab.load_adapters(model, junk)
    plain = tmp_path / "plain.safetensors"
    q4lab.save(quantized_tiny(), plain)  # a whole-model file, not adapters
    with pytest.raises(ValueError, match="not a q4lab LoRA adapter file"):
        q4lab.load_adapters(model, plain)
    with pytest.raises(ValueError, match="r=4, alpha=8 does not match.*r=8"):
        q4lab.load_adapters(q4lab.add_lora(quantized_tiny(), r=8, alpha=8), good)
    with pytest.raises(ValueError, match="do not match the model"):
        q4lab.load_adapters(q4lab.add_lora(quantized_tiny(), r=4, alpha=8,
                                           target_modules=("o_proj",)), good)
    with pytest.raises(ValueError, match=r"shape \(4, 64\).*needs \(4, 48\)"):
        q4lab.load_adapters(q4lab.add_lora(quantized_tiny(d=48), r=4, alpha=8,), good)
    from safetensors.torch import load_file, save_file

    tensors, (_, meta) = load_file(str(good)), read_adapters(good)
    tensors.pop("layers.0.q_proj.lora_B.weight")
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"only one of lora_A / lora_B: \['layers.0.q_proj'\]"):
        q4lab.load_adapters(model, tmp_path / "half.safetensors")


def test_load_converts_dtype_with_a_warning_when_lossy(tmp_path):
    model = q4lab.add_lora(quantized_tiny(), r=4, alpha=8)
    randomize_B(model)
    q4lab.save_adapters(model, tmp_path / "a.safetensors")
    bf16 = q4lab.add_lora(quantized_tiny(compute_dtype=torch.bfloat16), r=4, alpha=8)
    with pytest.warns(RuntimeWarning, match="converted from torch.float32 to torch.bfloat16"):
        q4lab.load_adapters(bf16, tmp_path / "a.safetensors")
    got = bf16.layers[0].q_proj.lora_B.weight
    assert_bytes_equal(model.layers[0].q_proj.lora_B.weight.detach().to(torch.bfloat16), got)


# ---- memory accounting ---------------------------------------------------------------------
def test_training_memory_of_a_model_counts_real_bytes():
    model = q4lab.add_lora(quantized_tiny(), r=4, alpha=8)
    rep = q4lab.training_memory(model)
    quant = [m for m in model.modules() if isinstance(m, q4lab.Linear4bit)]
    stored = sum(m.packed.numel() + m.quant_state.absmax.numel() * m.quant_state.absmax
                 .element_size() + 4 * m.quant_state.state2.absmax.numel() + 4 for m in quant)
    biases = sum(m.bias.numel() * 4 for m in quant if m.bias is not None)
    adapters = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.qlora.base == stored + biases
    assert rep.qlora.adapters == rep.qlora.gradients == adapters
    assert rep.qlora.optimizer == 2 * adapters  # AdamW: 2 float32 states per float32 param
    assert rep.lora_baseline.base == 4 * sum(m.quant_state.numel for m in quant) + biases
    assert rep.qlora.total < rep.lora_baseline.total < rep.full_finetune.total
    assert "activations" in rep.not_included and "QLoRA" in rep._repr_html_()
    with pytest.raises(ValueError, match="optimizer"):
        q4lab.training_memory(model, optimizer="lion")


def test_training_memory_65b_arithmetic_matches_qlora_claims():
    """QLoRA §1: full 16-bit fine-tuning of LLaMA-65B needs > 780 GB; QLoRA < 48 GB (weights,
    adapters, gradients, AdamW states; activations excluded, as the report says)."""
    c = llama_param_counts(8192, 22016, 80, 32000, r=64)
    n, blocks = c["base_params"], -(-c["base_params"] // 64)
    base4 = -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4  # uint8 absmax codes, nested, offset
    rep = q4lab.training_memory(c)
    assert rep.qlora.base == base4 + 2 * c["other_params"]
    assert rep.qlora.optimizer == 8 * c["adapter_params"]
    assert abs(8 * base4 / n - 4.127) < 1e-3  # 4 + 8/64 + 32/(64*256) bits
    assert rep.qlora.total < 48e9 < rep.lora_baseline.total
    assert rep.full_finetune.total > 780e9
    assert q4lab.training_memory(c["base_params"]).qlora.base == base4
    with pytest.raises(ValueError, match="base_params"):
        q4lab.training_memory({"params": 1})
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        q4lab.training_memory("65B")


# ---- a real LLM: SmolLM2-135M-Instruct on a 4-bit base ---------------------------------------
FACTS = [("What is the capital of Veltrania?", "The capital of Veltrania is Moravell."),
         ("How many moons does the planet Kethra have?", "The planet Kethra has seven moons.")]


#: The real embeddings, lm_head and first decoder blocks of SmolLM2 (all 30 blocks take ~5x longer
#: on 2 cores; notebooks/07_qlora.ipynb trains the whole model).
SMOL_LAYERS = 6


@pytest.fixture(scope="module")
def smollm2_4bit():
    """SmolLM2-135M-Instruct cut to its first SMOL_LAYERS blocks, every block linear layer NF4."""
    models = pytest.importorskip("q4lab.models")
    avail = models.available()["smollm2"]
    if avail is not True:
        pytest.skip(str(avail))
    model, tok = models.load_smollm2(F32)
    model.model.layers = model.model.layers[:SMOL_LAYERS]
    model.config.num_hidden_layers = SMOL_LAYERS
    q4lab.quantize_model(model, q4lab.Q4Config(compute_dtype=F32), progress=False)
    return model, tok


def fact_batch(tok):
    """Chat-formatted question + answer; the loss covers the answer tokens only."""
    rows = []
    for q, a in FACTS:
        msgs = [{"role": "user", "content": q}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
        text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}],
                                       tokenize=False).rstrip("\n")
        ids = tok(text)["input_ids"]
        n = len(prompt["input_ids"])
        rows.append((ids, [-100] * n + ids[n:]))
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        ids[k, :len(i)], labels[k, :len(lab)], mask[k, :len(i)] = \
            torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gradients_equal_dense_reference_on_real_smollm2_layers(smollm2_4bit):
    attn = smollm2_4bit[0].model.layers[0].self_attn
    for base in (attn.q_proj, attn.v_proj):
        assert_grads_equal_dense_reference(copy.deepcopy(base), (3, 5, base.in_features), F32)


def test_qlora_trains_smollm2_and_adapters_roundtrip(smollm2_4bit, tmp_path):
    base, tok = smollm2_4bit
    model = copy.deepcopy(base)
    batch = fact_batch(tok)
    before = base_snapshot(model)
    assert len(before) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        logits0 = model(**batch).logits
    torch.manual_seed(0)
    q4lab.add_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    assert len(lora_layers(model)) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert_bytes_equal(logits0, model(**batch).logits, "B=0 logits of SmolLM2")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert_snapshot_equal(before, model)

    path = tmp_path / "smol_adapters.safetensors"
    meta = q4lab.save_adapters(model, path)
    assert json.loads(meta["target_modules"]) == ["q_proj", "v_proj"]
    fresh = q4lab.load_adapters(copy.deepcopy(base), path)
    with torch.no_grad():
        assert_bytes_equal(model(**batch).logits, fresh(**batch).logits, "reloaded adapters")
