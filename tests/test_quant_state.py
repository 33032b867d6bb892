"""QuantState equality, hashing, repr, pickle and deepcopy (q4lab/state.py).

Source of the rule: bitsandbytes ``functional.py::QuantState.__eq__`` (shape, dtype, blocksize,
quant_type, code, absmax, offset and the nested state all equal). q4lab compares the arrays as
bytes (docstring of ``QuantState``): one changed byte anywhere (absmax, nested codes, nested absmax,
offset, codebook) makes two states unequal, -0.0 differs from +0.0, a NaN equals its own bit
pattern. States come from the real quantizers (the NumPy reference and the C++ kernels), never
hand-built stand-ins, and one test compares them with real bitsandbytes states.
"""
import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import q4lab
from q4lab import Linear4bit
from q4lab import reference as ref
from q4lab.state import QuantState

KINDS = [(qt, dq) for qt in ("nf4", "fp4", "int4") for dq in (False, True)]


def weight(shape=(72, 96), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def numpy_state(qt="nf4", dq=True, shape=(72, 96), seed=0):
    return ref.quantize_4bit(weight(shape, seed).numpy(), 64, qt, dq)[1]


def torch_state(qt="nf4", dq=True, shape=(72, 96), seed=0, dtype=torch.float32):
    return q4lab.quantize_4bit(weight(shape, seed, dtype), 64, qt, dq, backend="cpu")[1]


def flip_byte(array, index: int):
    """A copy of ``array`` (NumPy or torch) with byte ``index`` (taken modulo its size) XOR 1."""
    if isinstance(array, np.ndarray):
        out = np.array(array, copy=True)
        raw = out.reshape(-1).view(np.uint8)
    else:
        out = array.detach().clone()
        raw = out.reshape(-1).view(torch.uint8)
    size = raw.size if isinstance(raw, np.ndarray) else raw.numel()
    raw[index % size] ^= 1
    return out


def with_flip(state: QuantState, part: str, index: int = 0) -> QuantState:
    """A deep copy of ``state`` with one byte of ``part`` changed (the original is untouched, and
    so are the shared codebook constants: the copy owns its arrays)."""
    changed = copy.deepcopy(state)
    if part.startswith("state2."):
        nested = changed.state2
        setattr(nested, part[7:], flip_byte(getattr(nested, part[7:]), index))
    else:
        setattr(changed, part, flip_byte(getattr(changed, part), index))
    return changed


@pytest.mark.parametrize("qt,dq", KINDS)
@pytest.mark.parametrize("make", [numpy_state, torch_state], ids=["numpy", "torch"])
def test_state_equals_itself_its_copies_and_pickles(make, qt, dq):
    state = make(qt, dq)
    copies = {"same object": state, "second quantization": make(qt, dq),
              "deepcopy": copy.deepcopy(state), "copy": copy.copy(state),
              "pickle": pickle.loads(pickle.dumps(state))}
    for how, other in copies.items():
        assert state == other and other == state and not state != other, how
    restored = copies["pickle"]
    assert restored.dtype == "float32" and restored.dtype == torch.float32  # DtypeName survives
    assert type(restored.absmax) is type(state.absmax)
    assert restored.nested == dq and (restored.state2 is not None) == dq


@pytest.mark.parametrize("qt,dq", KINDS)
def test_numpy_and_torch_payloads_of_the_same_state_are_equal(qt, dq):
    """The reference and the kernel give the same bytes, so their states are equal; where the
    arrays live is not part of the state (documented in QuantState's docstring)."""
    np_state, t_state = numpy_state(qt, dq), torch_state(qt, dq)
    assert not np_state.is_torch and t_state.is_torch
    assert np_state == t_state and t_state == np_state
    assert np_state.to() == np_state and t_state.numpy() == t_state
    assert np_state != torch_state(qt, dq, seed=1)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("make", [numpy_state, torch_state], ids=["numpy", "torch"])
def test_one_changed_byte_makes_states_unequal(make, dq):
    state = make("nf4", dq)
    parts = ["absmax", "code"] + (["offset", "state2.absmax", "state2.code"] if dq else [])
    for part in parts:
        for index in (0, 1, -1):
            changed = with_flip(state, part, index)
            assert changed != state and state != changed, (part, index)
            assert not changed == state, (part, index)
    assert copy.deepcopy(state) == state  # the flips changed copies only


@pytest.mark.parametrize("make", [numpy_state, torch_state], ids=["numpy", "torch"])
def test_every_field_takes_part(make):
    state = make("nf4", True)
    for field, value in [("shape", (96, 72)), ("dtype", "bfloat16"), ("blocksize", 128),
                         ("quant_type", "fp4"), ("offset", None), ("state2", None)]:
        changed = copy.deepcopy(state)
        setattr(changed, field, value)
        assert changed != state, field
    assert make("nf4", False) != make("nf4", True)  # plain vs double-quantized
    nested = copy.deepcopy(state)
    nested.state2.blocksize = 512
    assert nested != state
    wider = copy.deepcopy(state)  # same values, another dtype: other bytes
    wider.state2.absmax = wider.state2.absmax.astype(np.float64) if isinstance(
        wider.state2.absmax, np.ndarray) else wider.state2.absmax.double()
    assert wider != state


def test_offset_is_compared_as_its_float32_scalar():
    state = numpy_state()
    for offset in (np.float32(state.offset_value), state.offset_value,
                   np.asarray([state.offset_value], dtype=np.float32),
                   torch.tensor(state.offset_value)):
        other = copy.deepcopy(state)
        other.offset = offset
        assert other == state, type(offset)
    other = copy.deepcopy(state)
    other.offset = np.nextafter(np.float32(state.offset_value), np.float32(np.inf))
    assert other != state


@pytest.mark.parametrize("to_array", [np.asarray, torch.tensor], ids=["numpy", "torch"])
def test_signed_zero_differs_and_nan_equals_its_own_bits(to_array):
    """Bytes, not IEEE ==: -0.0 decodes to zeros of another sign, so it is another state; the
    same NaN bit pattern is equal (every state equals itself), another NaN payload is not."""
    def state(absmax):
        return QuantState(shape=(128,), dtype="float32", blocksize=64, quant_type="nf4",
                          code=to_array(ref.codebook("nf4")),
                          absmax=to_array(np.asarray(absmax, dtype=np.float32)))

    assert state([0.0, 1.0]) == state([0.0, 1.0])
    assert state([-0.0, 1.0]) != state([0.0, 1.0])
    quiet, payload = np.float32(np.nan), np.uint32(0x7FC00001).view(np.float32)
    assert state([quiet, 1.0]) == state([quiet, 1.0])
    assert state([quiet, 1.0]) != state([payload, 1.0])


def test_unhashable_and_other_types_are_unequal():
    state = torch_state()
    with pytest.raises(TypeError, match="unhashable"):
        hash(state)
    assert QuantState.__hash__ is None
    assert state != "QuantState" and state != None and state != state.absmax  # noqa: E711
    assert state in [numpy_state()]  # membership uses __eq__


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       dq=st.booleans(), part=st.sampled_from(["absmax", "offset", "state2.absmax",
                                                "state2.code", "code"]),
       index=st.integers(0, 10**6))
def test_any_byte_anywhere_matters(rows, cols, seed, dq, part, index):
    """Random shapes (blocks straddling rows, a last partial block): a state equals its pickled
    torch copy, and a flip of any byte of any part makes it unequal."""
    state = numpy_state("nf4", dq, (rows, cols), seed)
    assert pickle.loads(pickle.dumps(state.to())) == state
    if not dq and (part == "offset" or part.startswith("state2.")):
        part = "absmax"
    assert with_flip(state, part, index) != state
    assert with_flip(state.to(), part, index) != state


def test_states_survive_save_load_and_bnb_state_dict(tmp_path):
    """What users compare after a round trip: a layer's state after q4lab.save / q4lab.load and
    after to_bnb_state_dict / from_bnb_state_dict equals the original."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 72), torch.nn.Linear(72, 40))
    quantized = q4lab.quantize_model(copy.deepcopy(model), q4lab.Q4Config(min_numel=0))
    path = tmp_path / "model.safetensors"
    q4lab.save(quantized, path)
    loaded = q4lab.load(copy.deepcopy(model), path)
    restored = q4lab.from_bnb_state_dict(copy.deepcopy(model), q4lab.to_bnb_state_dict(quantized))
    for i in range(2):
        original = quantized[i].quant_state
        assert isinstance(loaded[i], Linear4bit) and loaded[i].quant_state == original
        assert restored[i].quant_state == original
        assert loaded[i].quant_state != quantized[1 - i].quant_state


def test_bitsandbytes_agrees_on_what_is_equal():
    """bitsandbytes' own QuantState.__eq__ on the same parts (q4lab state -> bnb QuantState) says
    equal where q4lab does, and unequal for a changed absmax byte."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")

    def to_bnb(s):
        s = s.to("cpu")
        nested = None if s.state2 is None else bnb_functional.QuantState(
            absmax=s.state2.absmax, code=s.state2.code, blocksize=s.state2.blocksize,
            dtype=torch.float32)
        return bnb_functional.QuantState(absmax=s.absmax, shape=torch.Size(s.shape), code=s.code,
                                         blocksize=s.blocksize, quant_type=s.quant_type,
                                         dtype=s.dtype.torch, offset=s.offset, state2=nested)

    state = torch_state("nf4", True)
    changed = with_flip(state, "state2.absmax", 2)
    assert (to_bnb(state) == to_bnb(copy.deepcopy(state))) and state == copy.deepcopy(state)
    assert not (to_bnb(state) == to_bnb(changed)) and state != changed


def test_repr_is_readable_and_never_raises():
    state = torch_state("nf4", True, dtype=torch.bfloat16)
    text = repr(state)
    assert text.startswith("QuantState(nf4, shape=(72, 96), dtype=bfloat16, blocksize=64, ")
    assert "108 blocks" in text and "absmax=uint8[108]" in text and "torch cpu" in text
    assert f"absmax=uint8[108], nested, offset={state.offset_value:.7g}, " in text
    assert "state2=QuantState(dynamic, shape=(108,), dtype=float32, blocksize=256" in text
    assert "absmax=float32[1]" in text
    plain = repr(numpy_state("fp4", False))
    assert "absmax=float32[108]" in plain and "nested" not in plain
    assert "state2" not in plain and plain.endswith(", numpy)")
    broken = QuantState(shape=(3,), dtype="float32", blocksize=64, quant_type="nf4", code=None,
                        absmax=None, offset=np.zeros(3, np.float32))
    assert "absmax=None" in repr(broken) and "offset=float32[3]" in repr(broken)
