"""q4lab <-> bitsandbytes 0.50.2 (real, CPU) through bnb's 4-bit state-dict layout.

Source of the layout: bnb ``QuantState.as_dict(packed=True)`` / ``Params4bit.from_prequantized``
(bnb-4bit-format.md §7). Claims checked byte for byte: a q4lab layer exported to a real
``bitsandbytes.nn.Linear4bit`` holds the same packed bytes and gives the same fp32 outputs; a
bnb-quantized layer imported into q4lab likewise; bnb CPU and q4lab produce identical NF4 packed
bytes on ordinary data. Known differences are asserted as what they are: bnb CPU's FP4 swaps the
±0 codes for tiny values (format §8.5), and its C++ FP4 dequant writes -0.0 for code 8 (§6).
"""
import pytest
import torch
from torch import nn

import q4lab
from q4lab import Linear4bit, interop, testing

bnb = pytest.importorskip("bitsandbytes")

CASES = [((96, 160), 64, True, torch.float32), ((33, 70), 32, False, torch.bfloat16),
         ((3, 96), 64, True, torch.float16), ((5, 160), 64, True, torch.float32),
         ((128, 256), 4096, True, torch.float32), ((7, 9), 128, False, torch.float32),
         ((300, 520), 256, True, torch.bfloat16)]


def avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def linear(shape, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(shape[1], shape[0], dtype=dtype)


def bnb_quantized(lin, quant_type, blocksize, dq):
    """A real bnb.nn.Linear4bit quantized by bitsandbytes itself (Params4bit._quantize on CPU)."""
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                     blocksize=blocksize, compress_statistics=dq,
                                     quant_type=quant_type, module=layer)._quantize("cpu")
    layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer


def bnb_dequant(layer):
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def signed_zero_only(a, b) -> bool:
    """True if a and b differ only where both are zeros of opposite sign."""
    diff = a.view(torch.int32) != b.view(torch.int32) if a.dtype == torch.float32 else \
        a.view(torch.int16) != b.view(torch.int16)
    return bool((a[diff] == 0).all() and (b[diff] == 0).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, bs, dq, dtype", CASES)
def test_q4lab_layer_into_real_bnb_linear4bit(quant_type, shape, bs, dq, dtype):
    l4 = Linear4bit.from_linear(linear(shape, dtype), bs, quant_type, dq, torch.float32)
    b = interop.to_bnb_linear(l4)
    testing.assert_bytes_equal(l4.packed, b.weight.data.reshape(-1), "packed")
    assert tuple(b.weight.data.shape) == ((shape[0] * shape[1] + 1) // 2, 1)
    x = torch.randn(4, shape[1])
    mine, theirs = l4.dequantized_weight(dtype), bnb_dequant(b)
    msg = testing.byte_mismatch(mine, theirs)
    bug = avx512() and shape[1] % bs != 0 and shape[1] % 16 == 0 and shape[0] > 1
    if quant_type == "fp4" and msg:  # bnb's C++ FP4 dequant writes -0.0 for code 8 (format §6)
        assert signed_zero_only(mine.float(), theirs.float()), msg
    elif bug and msg:  # bnb's AVX-512 dequant indexes absmax per row (format §6)
        pytest.xfail(f"bnb AVX-512 dequant shape bug: {msg}")
    else:
        assert msg is None, msg
    # after the xfail decision: on AVX-512 bnb's forward goes through the same buggy dequantizer
    testing.assert_bytes_equal(l4(x), b(x), "layer output fp32")
    back = interop.from_bnb_linear(b, torch.float32)
    testing.assert_bytes_equal(l4.packed, back.packed, "bnb -> q4lab packed")
    testing.assert_states_equal(l4.quant_state, back.quant_state, "bnb -> q4lab state")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, bs, dq, dtype", CASES[:4])
def test_bnb_quantized_layer_into_q4lab(quant_type, shape, bs, dq, dtype):
    lin = linear(shape, dtype, seed=1)
    b = bnb_quantized(lin, quant_type, bs, dq)
    q = interop.from_bnb_linear(b, torch.float32)
    testing.assert_bytes_equal(b.weight.data.reshape(-1), q.packed, "packed")
    x = torch.randn(3, shape[1])
    testing.assert_bytes_equal(b(x), q(x), "layer output fp32")
    own = Linear4bit.from_linear(lin, bs, quant_type, dq, torch.float32)
    msg = testing.byte_mismatch(b.weight.data.reshape(-1), own.packed)
    if quant_type == "nf4":
        assert msg is None, f"q4lab and bnb CPU NF4 bytes: {msg}"
    else:
        assert_fp4_differences_are_bnb_cpu_rules(b.weight.data.reshape(-1), own.packed, msg)


FP4_RANK = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3]).argsort()  # magnitude code -> size rank


def assert_fp4_differences_are_bnb_cpu_rules(bnb_packed, q4_packed, msg):
    """bnb CPU FP4 (format §8.5): tiny positives get 0b1000 and tiny negatives 0 (the ±0 swap),
    and a negative value exactly on a bound goes to the larger magnitude (q4lab: the smaller).
    Every differing code must be one of those two; anything else fails."""
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


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_model_state_dict_into_fresh_q4lab_model(quant_type):
    bnet = Net()
    for name in ("a", "b"):
        setattr(bnet, name, bnb_quantized(getattr(bnet, name), quant_type, 64, True))
    sd = bnet.state_dict()
    assert "a.weight.quant_state.bitsandbytes__" + quant_type in sd
    qnet = q4lab.from_bnb_state_dict(Net(), sd, compute_dtype=torch.float32)
    assert isinstance(qnet.a, Linear4bit) and isinstance(qnet.b, Linear4bit)
    x = torch.randn(6, 96)
    with torch.no_grad():
        testing.assert_bytes_equal(bnet(x), qnet(x), "model output")
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
