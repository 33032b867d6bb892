"""q4lab <-> bitsandbytes 0.50.2 (real, CPU) through bnb's 4-bit state-dict layout.

Source of the layout: bnb ``QuantState.as_dict(packed=True)`` / ``Params4bit.from_prequantized``
(docs/format.md §10). Claims checked byte for byte: a q4lab layer exported to a real
``bitsandbytes.nn.Linear4bit`` holds the same packed bytes, and bnb dequantizes them to exactly the
values ``bnb_cpu_dequantize`` predicts (q4lab's values, on whichever of bnb's three CPU dequant
paths this machine and shape take, with that path's known deviations); a bnb-quantized layer
imported into q4lab likewise; bnb CPU and q4lab produce identical NF4 packed bytes on ordinary data.
Known differences are asserted as what they are (docs/bitsandbytes.md §1): bnb CPU's FP4 swaps the
±0 codes for tiny values and sends negative ties up, its scalar C++ FP4 dequant writes -0.0 for
code 8, and its AVX-512 dequant indexes absmax per row.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q4lab
from q4lab import Linear4bit, _build, ops, testing
from q4lab.formats import bnb as interop
from q4lab import reference as ref
from q4lab.constants import BNB_QUANT_TYPES, FP4_SIGN_BIT

bnb = pytest.importorskip("bitsandbytes")
from helpers import bnb_linear4bit  # noqa: E402

CASES = [((96, 160), 64, True, torch.float32), ((33, 70), 32, False, torch.bfloat16),
         ((3, 96), 64, True, torch.float16), ((5, 160), 64, True, torch.float32),
         ((128, 256), 4096, True, torch.float32), ((7, 9), 128, False, torch.float32),
         ((300, 520), 256, True, torch.bfloat16), ((4, 64), 64, True, torch.float32),
         ((2, 4096), 2048, True, torch.float16)]


def avx512() -> bool:
    return "avx512f" in _build.cpu_flags()


def bnb_cpu_path(in_features: int, blocksize: int) -> str:
    """Which dequantizer bnb 0.50.2 runs for a CPU weight (docs/bitsandbytes.md §1): the torch
    code when the last dimension is odd, or on AVX-512 at blocksize >= 2048; the AVX-512 C++ loop
    when the CPU has AVX-512F and the last dimension is a multiple of 16; the scalar C++ loop
    otherwise."""
    if in_features % 2 or (avx512() and blocksize >= 2048):
        return "torch"
    return "avx512" if avx512() and in_features % 16 == 0 else "scalar"


def bnb_cpu_dequantize(layer: Linear4bit, dtype: torch.dtype, path: str) -> torch.Tensor:
    """What bnb's CPU ``dequantize_4bit`` computes from ``layer``'s bytes on ``path``: the float32
    product table[code] * absmax (q4lab's decoded absmax; bnb decodes nested codes the same way),
    rounded to ``dtype``. "avx512" reads absmax[row * (K // blocksize) + k // blocksize] (wrong
    when K is not a multiple of the blocksize and there is more than one row); "scalar" writes
    -0.0 for FP4 code 8; "torch" is q4lab's own rule."""
    s = layer.quant_state
    rows, k_dim = s.shape
    n = rows * k_dim
    codes = torch.stack([layer.packed >> 4, layer.packed & 15], 1).reshape(-1)[:n].long()
    e = torch.arange(n)
    block = (e // k_dim) * (k_dim // s.blocksize) + (e % k_dim) // s.blocksize \
        if path == "avx512" else e // s.blocksize
    out = torch.from_numpy(ref.codebook(s.quant_type))[codes] * ops.absmax_of(s)[block]
    if path == "scalar" and s.quant_type == "fp4":
        out = torch.where(codes == FP4_SIGN_BIT, torch.tensor(-0.0), out)
    return out.reshape(rows, k_dim).to(dtype)


def linear(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(shape[1], shape[0], dtype=dtype)


def bnb_dequant(layer):
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def assert_bnb_computes(b, l4: Linear4bit, x: torch.Tensor) -> None:
    """bnb's dequantized weight and fp32 layer output, byte for byte, against the prediction for
    this machine's path; and the prediction on q4lab's own path ("torch") is q4lab's values."""
    s = l4.quant_state
    path = bnb_cpu_path(s.shape[1], s.blocksize)
    testing.assert_bytes_equal(bnb_cpu_dequantize(l4, s.dtype.torch, path), bnb_dequant(b),
                               f"bnb dequantize ({path} path)")
    testing.assert_bytes_equal(l4.dequantized_weight(s.dtype.torch),
                               bnb_cpu_dequantize(l4, s.dtype.torch, "torch"), "q4lab values")
    weight = bnb_cpu_dequantize(l4, torch.float32, path)  # bnb's forward dequantizes to fp32
    bias = None if b.bias is None else b.bias.float()
    testing.assert_bytes_equal(F.linear(x, weight, bias), b(x), f"bnb layer output ({path})")


@pytest.mark.parametrize("quant_type", BNB_QUANT_TYPES)
@pytest.mark.parametrize("shape, bs, dq, dtype", CASES)
def test_q4lab_layer_into_real_bnb_linear4bit(quant_type, shape, bs, dq, dtype):
    l4 = Linear4bit.from_linear(linear(shape, dtype), bs, quant_type, dq, torch.float32)
    b = interop.to_bnb_linear(l4)
    testing.assert_bytes_equal(l4.packed, b.weight.data.reshape(-1), "packed")
    assert tuple(b.weight.data.shape) == ((shape[0] * shape[1] + 1) // 2, 1)
    assert_bnb_computes(b, l4, torch.randn(4, shape[1]))
    back = interop.from_bnb_linear(b, torch.float32)
    testing.assert_bytes_equal(l4.packed, back.packed, "bnb -> q4lab packed")
    testing.assert_states_equal(l4.quant_state, back.quant_state, "bnb -> q4lab state")


@pytest.mark.parametrize("quant_type", BNB_QUANT_TYPES)
@pytest.mark.parametrize("shape, bs, dq, dtype", CASES[:4])
def test_bnb_quantized_layer_into_q4lab(quant_type, shape, bs, dq, dtype):
    lin = linear(shape, dtype, seed=1)
    b = bnb_linear4bit(lin, quant_type, bs, dq)
    q = interop.from_bnb_linear(b, torch.float32)
    testing.assert_bytes_equal(b.weight.data.reshape(-1), q.packed, "packed")
    assert_bnb_computes(b, q, torch.randn(3, shape[1]))
    own = Linear4bit.from_linear(lin, bs, quant_type, dq, torch.float32)
    msg = testing.byte_mismatch(b.weight.data.reshape(-1), own.packed)
    if quant_type == "nf4":
        assert msg is None, f"q4lab and bnb CPU NF4 bytes: {msg}"
    else:
        assert_fp4_differences_are_bnb_cpu_rules(b.weight.data.reshape(-1), own.packed, msg)


FP4_RANK = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3]).argsort()  # magnitude code -> size rank


def assert_fp4_differences_are_bnb_cpu_rules(bnb_packed, q4_packed, msg):
    """bnb CPU FP4 (docs/bitsandbytes.md §1): tiny positives get 0b1000 and tiny negatives 0 (the ±0
    swap), and a negative value exactly on a bound goes to the larger magnitude (q4lab: the
    smaller). Every differing code must be one of those two; anything else fails."""
    cb = torch.stack([bnb_packed >> 4, bnb_packed & 15]).long()
    cq = torch.stack([q4_packed >> 4, q4_packed & 15]).long()
    d = cb != cq
    zero_swap = ((cb[d] | 8) == 8) & ((cq[d] | 8) == 8)
    neg_tie = (cb[d] >= 8) & (cq[d] >= 8) & (FP4_RANK[cb[d] & 7] == FP4_RANK[cq[d] & 7] + 1)
    assert (zero_swap | neg_tie).all(), msg


def test_int4_is_refused_for_bnb_export():
    l4 = Linear4bit.from_linear(nn.Linear(64, 64), 64, "int4", True)
    with pytest.raises(ValueError, match="int4.*no bitsandbytes equivalent"):
        q4lab.to_bnb_state_dict(l4)
    with pytest.raises(ValueError, match="no bitsandbytes equivalent"):
        q4lab.to_bnb_state_dict(nn.Sequential(l4))


def test_layer_state_dict_keys_and_json():
    l4 = Linear4bit.from_linear(nn.Linear(70, 33), 64, "nf4", True)
    sd = q4lab.to_bnb_state_dict(l4)
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}
    assert sd["weight"].shape == (1155, 1) and sd["weight.absmax"].dtype == torch.uint8
    import json

    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()))
    assert meta == l4.quant_state.bnb_json() and meta["shape"] == [33, 70]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.norm, self.b = nn.Linear(96, 192), nn.LayerNorm(192), nn.Linear(192, 80)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


@pytest.mark.parametrize("quant_type", BNB_QUANT_TYPES)
def test_bnb_model_state_dict_into_fresh_q4lab_model(quant_type):
    bnet = Net()
    for name in ("a", "b"):
        setattr(bnet, name, bnb_linear4bit(getattr(bnet, name), quant_type, 64, True))
    sd = bnet.state_dict()
    assert "a.weight.quant_state.bitsandbytes__" + quant_type in sd
    qnet = q4lab.from_bnb_state_dict(Net(), sd, compute_dtype=torch.float32)
    assert isinstance(qnet.a, Linear4bit) and isinstance(qnet.b, Linear4bit)
    inputs = {}
    for name in ("a", "b"):  # each bnb layer's real input inside the model
        getattr(bnet, name).register_forward_hook(
            lambda _m, args, _out, name=name: inputs.__setitem__(name, args[0]))
    with torch.no_grad():
        bnet(torch.randn(6, 96))
        for name in ("a", "b"):
            assert_bnb_computes(getattr(bnet, name), getattr(qnet, name), inputs[name])
    back = q4lab.to_bnb_state_dict(qnet)
    assert back.keys() == sd.keys()
    for k in sd:
        testing.assert_bytes_equal(sd[k], back[k], k)


def _meta_edit(sd, key, **change):
    import json

    meta = json.loads(bytes(sd[key].numpy()))
    meta.update(change)
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


QS = "a.weight.quant_state.bitsandbytes__nf4"
BAD = {
    "quant_type mismatch": (lambda sd: _meta_edit(sd, QS, quant_type="fp4"), "quant_type"),
    "bad blocksize": (lambda sd: _meta_edit(sd, QS, blocksize=48), "blocksize"),
    "bad dtype": (lambda sd: _meta_edit(sd, QS, dtype="float64"), "dtype"),
    "bad offset": (lambda sd: _meta_edit(sd, QS, nested_offset="x"), "nested_offset"),
    "json not utf8": (lambda sd: sd.update({QS: torch.tensor([255, 254], dtype=torch.uint8)}),
                      "JSON"),
    "json tensor wrong dtype": (lambda sd: sd.update({QS: sd[QS].float()}), "uint8"),
    "nested map from bnb 0.49": (lambda sd: sd["a.weight.nested_quant_map"].__setitem__(0, -1.0),
                                 "nested_quant_map.*index|first at 0"),
    "packed wrong dtype": (lambda sd: sd.update({"a.weight": sd["a.weight"].to(torch.int16)}),
                           "dtype"),
    "absmax wrong length": (lambda sd: sd.update({"a.weight.absmax": sd["a.weight.absmax"][:-2]}),
                            "shape"),
    "two quant states": (lambda sd: sd.update({"a.weight.quant_state.bitsandbytes__fp4": sd[QS]}),
                         "more than one"),
    "unknown layer": (lambda sd: sd.update({"zz." + k[2:]: v for k, v in list(sd.items())
                                            if k.startswith("a.")}), "zz"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_from_bnb_state_dict_rejects_bad_input_and_leaves_model_unchanged(name):
    edit, match = BAD[name]
    src = q4lab.quantize_model(Net(), q4lab.Q4Config(min_numel=0), progress=False)
    sd = {k: v.clone() for k, v in q4lab.to_bnb_state_dict(src).items()}
    edit(sd)
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        q4lab.from_bnb_state_dict(target, sd)
    assert isinstance(target.a, nn.Linear) and isinstance(target.b, nn.Linear)
    for k, v in target.state_dict().items():
        testing.assert_bytes_equal(before[k], v, k)
