"""The reference's rounding rules, one named test per bucket of docs/format.md §1-§8.

Each test builds inputs that land exactly where a rule matters (a threshold and one float32 ulp
either side, signed zeros, subnormal and huge blocks, all-zero blocks, tails, odd n, exact ties of
the 8-bit encoder) and checks codes and bytes against values derived independently in the test.
"""
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from q4lab import reference as ref
from q4lab.reference import blockwise, double_quant
from q4lab.state import bits_per_param, storage_bytes, storage_bytes_for
from q4lab.testing import assert_bytes_equal, boundary_values, sample_inputs

F32 = np.float32


def codes_of(x, quant_type="nf4", blocksize=32):
    packed, _ = ref.quantize_4bit(np.asarray(x, F32), blocksize, quant_type, double_quant=False)
    return blockwise.unpack_nibbles(packed, len(x))


def nearest_code_nf4(v):
    """Independent oracle: nearest NF4 level by exact rational distance, ties to the lower code."""
    table = [Fraction(float(c)) for c in ref.nf4_codebook()]
    d = [abs(Fraction(float(v)) - c) for c in table]
    return min(range(16), key=lambda k: (d[k], k))


@pytest.mark.parametrize("k", range(15))
def test_nf4_threshold_exact_and_one_ulp_either_side(k):
    t = ref.thresholds("nf4")[k]
    below, above = np.nextafter(t, F32(-2)), np.nextafter(t, F32(2))
    # a leading 1.0 makes absmax 1, so the scaled values are the values themselves
    codes = codes_of([1.0, below, t, above])
    assert list(codes[1:]) == [k, k, k + 1]  # a value exactly on t_k goes to the lower code
    assert codes[1] == nearest_code_nf4(below) and codes[3] == nearest_code_nf4(above)


@pytest.mark.parametrize("k", range(7))
def test_fp4_threshold_both_signs_ties_to_smaller_magnitude(k):
    order = ref.fp4_magnitude_order()
    t = ref.thresholds("fp4")[k]
    below, above = np.nextafter(t, F32(-2)), np.nextafter(t, F32(2))
    codes = codes_of([1.0, below, t, above, -below, -t, -above], "fp4")
    assert list(codes[1:4]) == [order[k], order[k], order[k + 1]]
    assert list(codes[4:]) == [8 | order[k], 8 | order[k], 8 | order[k + 1]]


def test_signed_zeros():
    assert list(codes_of([1.0, 0.0, -0.0], "nf4")) == [15, 7, 7]
    assert list(codes_of([1.0, 0.0, -0.0], "fp4")) == [3, 0, 0]  # -0.0 is not < 0: no sign bit
    # a tiny negative value whose magnitude rounds to 0 keeps its sign bit (code 0b1000) ...
    tiny = -F32(1e-3) * ref.thresholds("fp4")[0]
    assert list(codes_of([1.0, tiny], "fp4")) == [3, 8]
    packed, state = ref.quantize_4bit(np.array([1.0, tiny], F32), 32, "fp4", False)
    # ... which dequantizes to +0.0, as bitsandbytes' table has it
    assert ref.dequantize_4bit(packed, state).view(np.uint32)[1] == 0


@pytest.mark.parametrize("quant_type,zero_byte", [("nf4", 0x77), ("fp4", 0x00)])
def test_all_zero_block_gives_zero_codes_and_positive_zero(quant_type, zero_byte):
    x = np.zeros(96, F32)
    x[64:] = np.linspace(-1, 1, 32)
    x[5] = -0.0
    packed, state = ref.quantize_4bit(x, 32, quant_type, double_quant=False)
    assert state.absmax[0] == 0 and state.absmax[1] == 0
    assert (packed[:32] == zero_byte).all()
    out = ref.dequantize_4bit(packed, state)
    assert (out[:64].view(np.uint32) == 0).all()  # +0.0, never -0.0


def test_pack_puts_even_element_in_high_nibble():
    codes = np.array([1, 2, 3, 4, 5], np.uint8)
    assert list(blockwise.pack_nibbles(codes, "nf4")) == [0x12, 0x34, 0x57]  # odd: zero-code pad
    assert list(blockwise.pack_nibbles(codes, "fp4")) == [0x12, 0x34, 0x50]
    assert_bytes_equal(codes, blockwise.unpack_nibbles(blockwise.pack_nibbles(codes, "nf4"), 5))


@pytest.mark.parametrize("blocksize", ref.BLOCKSIZES)
def test_tail_block_and_odd_n(blocksize):
    rng = np.random.default_rng(blocksize)
    n = 3 * blocksize + 5
    x = rng.standard_normal(n).astype(F32)
    packed, state = ref.quantize_4bit(x, blocksize, "nf4", double_quant=False)
    assert packed.size == (n + 1) // 2 and state.absmax.size == 4
    assert state.absmax[3] == np.abs(x[3 * blocksize:]).max()  # over the valid elements only
    assert packed[-1] & 0x0F == 7  # pad nibble is the zero code
    # the tail quantizes like the same values padded by hand with zeros
    padded = np.zeros(4 * blocksize, F32)
    padded[:n] = x
    p2, _ = ref.quantize_4bit(padded, blocksize, "nf4", double_quant=False)
    assert_bytes_equal(p2[: n // 2], packed[: n // 2], "tail vs zero-padded")


def test_reciprocal_is_multiplied_not_divided():
    """xn = RN(x * RN(1/absmax)); find a value where x/absmax would round differently."""
    rng = np.random.default_rng(1)
    a = F32(3.0)
    r = F32(1.0) / a
    xs = rng.uniform(-3, 3, 100000).astype(F32)
    mul, div = (xs * r).astype(F32), (xs / a).astype(F32)
    x = xs[np.flatnonzero(mul != div)[0]]
    blocks = np.array([[a, x]], F32)
    prescale, recip = blockwise.reciprocal_scale(blocks.max(axis=1))
    assert_bytes_equal(np.array([a * r, x * r], F32),
                       blockwise.scale_blocks(blocks, prescale, recip)[0], "scaled values")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("exponent", [-140, -130, -100, 100, 126])
def test_subnormal_and_huge_blocks_code_like_scaled_copies(quant_type, exponent):
    """Power-of-two scaling of a block changes absmax exactly and no code: the prescale rule keeps
    subnormal blocks (and blocks near FLT_MAX) from overflowing the reciprocal."""
    rng = np.random.default_rng(exponent + 200)
    base = rng.standard_normal(256).astype(F32)
    base[::64] = 1.5  # keep blocks' absmax away from 0
    scaled = (base.astype(np.float64) * 2.0**exponent).astype(F32)
    exact = scaled.astype(np.float64) * 2.0**-exponent == base  # drop values that lost bits
    base, scaled = base[exact[: base.size]], scaled[exact[: base.size]]
    p1, s1 = ref.quantize_4bit(base, 64, quant_type, double_quant=False)
    p2, s2 = ref.quantize_4bit(scaled, 64, quant_type, double_quant=False)
    assert_bytes_equal(p1, p2, f"codes at 2^{exponent}")
    assert_bytes_equal((s1.absmax.astype(np.float64) * 2.0**exponent).astype(F32), s2.absmax)


def test_subnormal_values_are_not_flushed():
    x = np.array([F32(1.4e-45), F32(-6e-41), 0.0, F32(1e-40)], F32)
    packed, state = ref.quantize_4bit(x, 32, "nf4", double_quant=False)
    assert state.absmax[0] == F32(1e-40)
    out = ref.dequantize_4bit(packed, state)
    # 1.4e-45 is 1.4e-5 of absmax: the zero code; -6e-41 is -0.6 of it: a negative subnormal
    assert out[3] == F32(1e-40) and out[0] == 0.0 and -7e-41 < out[1] < -5e-41


def test_exact_mean_is_rounded_once():
    rng = np.random.default_rng(7)
    for size in (1, 2, 3, 255, 256, 1000, 4097):
        v = np.abs(rng.standard_normal(size) * rng.choice([1e-3, 1.0, 1e3, 1e-41], size))
        v = v.astype(F32)
        exact = sum(Fraction(float(a)) for a in v) / size
        got = double_quant.exact_mean_f32(v)
        err = abs(Fraction(float(got)) - exact)
        for nb in (np.nextafter(got, F32(0)), np.nextafter(got, F32(np.inf))):
            assert err <= abs(Fraction(float(nb)) - exact), size
    # a case where float32 accumulation goes wrong: one large value and many tiny ones
    v = np.array([1.0] + [2.0**-25] * 4096, F32)
    expected = F32(float((1 + Fraction(4096, 2**25)) / 4097))
    assert double_quant.exact_mean_f32(v) == expected
    assert double_quant.exact_mean_f32(v[::-1].copy()) == expected  # order-independent


def test_dynamic_encoder_ties_go_to_even_index():
    d = ref.dynamic_map()
    mids = ref.thresholds("dynamic")
    codes = double_quant.encode_dynamic(mids)
    expected = np.array([k if k % 2 == 0 else k + 1 for k in range(255)])
    assert list(codes) == list(expected)
    below = double_quant.encode_dynamic(np.nextafter(mids, F32(-2)))
    above = double_quant.encode_dynamic(np.nextafter(mids, F32(2)))
    assert list(below) == list(range(255)) and list(above) == list(range(1, 256))
    assert double_quant.encode_dynamic(np.array([-1.0, 0.0, 1.0], F32)).tolist() == [0, 127, 255]
    assert d[double_quant.encode_dynamic(np.array([0.5], F32))[0]] == d[np.argmin(abs(d - 0.5))]


def test_double_quant_state_and_dequant_formula():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(64 * 600) * 0.02).astype(F32)
    packed, state = ref.quantize_4bit(x, 64, "nf4", double_quant=True)
    _, plain = ref.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert state.absmax.dtype == np.uint8 and state.state2.absmax.size == 3
    assert state.offset == double_quant.exact_mean_f32(plain.absmax)
    centered = (plain.absmax - state.offset).astype(F32)
    for g in range(3):
        assert state.state2.absmax[g] == np.abs(centered[g * 256:(g + 1) * 256]).max()
    d = ref.dynamic_map()
    a2 = np.repeat(state.state2.absmax, 256)[:600]
    expected = ((d[state.absmax] * a2).astype(F32) + state.offset).astype(F32)
    assert_bytes_equal(expected, ref.state_absmax(state), "decoded absmax")


def test_all_zero_group_decodes_to_offset():
    absmax = np.full(300, 0.25, F32)  # every centered value is 0 in the first group
    absmax[256:] = [0.5] * 44
    codes, absmax2, offset = double_quant.quantize_absmax(absmax, offset=F32(0.25))
    assert absmax2[0] == 0 and (codes[:256] == 127).all()
    assert (double_quant.dequantize_absmax(codes, absmax2, offset)[:256] == F32(0.25)).all()


def test_given_offset_is_used():
    x = np.random.default_rng(4).standard_normal(64 * 10).astype(F32)
    _, state = ref.quantize_4bit(x, 64, "nf4", True, offset=0.125)
    assert state.offset == F32(0.125)


def test_bits_per_param_qlora_numbers():
    x = np.random.default_rng(5).standard_normal((4096, 4096)).astype(F32)
    _, nested = ref.quantize_4bit(x, 64, "nf4", double_quant=True)
    _, plain = ref.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert round(bits_per_param(plain), 3) == 4.5
    assert round(bits_per_param(nested), 3) == 4.127  # not 4.37: 0.373 bits saved (QLoRA §3)


def test_bfloat16_rounding_is_nearest_even():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = rng.standard_normal(10000).astype(F32)
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(F32)  # exact bf16 midpoints
    x = np.concatenate([x, ties, -ties])
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert_bytes_equal(expected, ref.round_to_bfloat16(x), "bf16 rounding")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dequantize_dtype_and_shape(dtype):
    x = np.random.default_rng(8).standard_normal((3, 5, 7)).astype(F32)
    packed, state = ref.quantize_4bit(x, 32, "nf4")
    out = ref.dequantize_4bit(packed, state, dtype)
    assert out.shape == (3, 5, 7)
    full = ref.dequantize_4bit(packed, state, "float32")
    if dtype == "float16":
        assert out.dtype == np.float16 and (out == full.astype(np.float16)).all()
    elif dtype == "bfloat16":
        assert_bytes_equal(ref.round_to_bfloat16(full), out)


def test_every_sample_round_trips_within_half_a_step():
    """Sanity over sample_inputs(): |out - x| <= a * max_half_gap + |a_dec - a| where a is the
    block's true absmax and a_dec the stored one (equal without double quant): the encoder picks a
    nearest level and |table| <= 1. With double quantization a block far below the mean absmax can
    decode to an absmax near zero, or even slightly negative: that is the format, not an error."""
    for s in sample_inputs(small=True):
        packed, state = ref.quantize_4bit(s.x, s.blocksize, s.quant_type, s.double_quant,
                                          dtype=s.dtype)
        _, plain = ref.quantize_4bit(s.x, s.blocksize, s.quant_type, False, dtype=s.dtype)
        out = ref.dequantize_4bit(packed, state, "float32").reshape(-1).astype(np.float64)
        a_true = np.repeat(plain.absmax, s.blocksize)[: out.size].astype(np.float64)
        a_dec = np.repeat(ref.state_absmax(state), s.blocksize)[: out.size].astype(np.float64)
        half_gap = np.diff(np.sort(ref.codebook(s.quant_type))).max() / 2
        tol = a_true * half_gap * (1 + 1e-6) + np.abs(a_dec - a_true) * (1 + 1e-6) + 1e-45
        assert (np.abs(out - s.x.reshape(-1)) <= tol).all(), s


@pytest.mark.parametrize("bad,kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_input_names_the_block(bad, kind):
    x = np.zeros(200, F32)
    x[130] = bad
    with pytest.raises(ValueError, match=rf"{kind} at flat index 130 \(block 2\)"):
        ref.quantize_4bit(x, 64)


@pytest.mark.parametrize("x,err,match", [
    (np.zeros(0, F32), ValueError, "empty"),
    (np.zeros(8, np.float64), TypeError, "float64"),
    (np.zeros(8, np.int32), TypeError, "int32"),
])
def test_bad_arrays(x, err, match):
    with pytest.raises(err, match=match):
        ref.quantize_4bit(x)


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        ref.quantize_4bit(np.ones(64, F32), blocksize)


def test_bad_quant_type_and_offset_without_double_quant():
    with pytest.raises(ValueError, match="quant_type"):
        ref.quantize_4bit(np.ones(64, F32), 64, "nf5")
    with pytest.raises(ValueError, match="offset"):
        ref.quantize_4bit(np.ones(64, F32), 64, "nf4", double_quant=False, offset=0.1)


def test_mismatched_state_is_rejected():
    packed, state = ref.quantize_4bit(np.ones((8, 64), F32), 64)
    with pytest.raises(ValueError, match="packed data has 255 bytes"):
        ref.dequantize_4bit(packed[:-1], state)
    _, other = ref.quantize_4bit(np.ones((4, 64), F32), 64)
    other.shape = (8, 64)
    with pytest.raises(ValueError, match="absmax values"):
        ref.dequantize_4bit(packed, other)


def test_reference_imports_without_torch():
    code = ("import sys; from q4lab import reference as ref; import numpy as np; "
            "ref.quantize_4bit(np.ones(64, np.float32)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_double_quant_never_decodes_a_negative_absmax():
    """Tiny and all-zero blocks beside an outlier (the sample of ``sample_inputs`` that every parity
    test runs): the nearest 8-bit code would decode their absmax below zero (bitsandbytes' rule),
    flipping signs; q4lab stores the next code up instead."""
    x = next(s.x for s in sample_inputs(seed=7) if s.name == "tiny-beside-outlier-nf4")
    packed, state = ref.quantize_4bit(x, 64, "nf4", double_quant=True)
    decoded = ref.state_absmax(state)
    assert not np.signbit(decoded).any()
    # the plain nearest codes would have gone negative here: the rule is doing work
    nearest = double_quant.encode_dynamic(
        ((np.abs(x).max(axis=1) - state.offset) / state.state2.absmax[0]).astype(F32))
    nearest_decoded = double_quant.dequantize_absmax(nearest, state.state2.absmax, state.offset)
    assert np.signbit(nearest_decoded).any()
    out = ref.dequantize_4bit(packed, state)
    assert (out[1].view(np.uint32) == 0).all()  # the all-zero row: +0.0
    assert (np.sign(out[2]) * np.sign(x[2]) >= 0).all()  # no sign flips in the tiny row


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_offset_is_rejected(offset):
    with pytest.raises(ValueError, match="not a finite float32"):
        ref.quantize_4bit(np.ones(64, F32), 64, "nf4", True, offset=offset)


def test_state_whose_absmax_kind_does_not_match_nesting_is_rejected():
    import dataclasses

    packed, state = ref.quantize_4bit(np.ones((4, 64), F32), 64)
    with pytest.raises(ValueError, match="uint8 but a plain state"):
        ref.dequantize_4bit(packed, dataclasses.replace(state, state2=None, offset=None))


def test_dequantize_dtype_accepts_numpy_types():
    packed, state = ref.quantize_4bit(np.ones(70, F32), 32)
    for dtype in (np.float16, np.dtype("float16"), "float16"):
        assert ref.dequantize_4bit(packed, state, dtype).dtype == np.float16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_boundary_values_hold_each_types_own_levels(quant_type):
    """``testing.boundary_values`` (the rounding-bucket inputs of the parity tests and the sweep)
    holds the type's own thresholds, ±1 ulp, and its own codebook levels: int4's levels k/7 are
    not FP4's (an int4 sample once took the FP4 table)."""
    vals = set(boundary_values(quant_type).view(np.uint32).tolist())
    t = ref.thresholds(quant_type)
    for want, what in ((ref.codebook(quant_type), "level"), (t, "threshold"),
                       (np.nextafter(t, F32(-2)), "threshold - 1 ulp"),
                       (np.nextafter(t, F32(2)), "threshold + 1 ulp")):
        missing = [float(v) for v in want if int(np.asarray(v, F32).view(np.uint32)) not in vals]
        assert not missing, f"{quant_type} boundary values lack {what}s {missing}"


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("n", [1, 63, 64 * 256 + 1, 3 * 4096 * 256 + 5])
def test_storage_bytes_formula_equals_the_arrays_of_a_real_state(n, blocksize, double_quant):
    """``storage_bytes_for`` (the one storage formula, also used by lora_memory and the memory
    calculator) equals the bytes a real quantized tensor holds, part by part; a state whose
    arrays do not have the format's sizes is refused instead of counted."""
    x = np.random.default_rng(n).standard_normal(n).astype(F32)
    packed, state = ref.quantize_4bit(x, blocksize, "nf4", double_quant)
    held = {"packed": packed.nbytes, **state.nbytes()}
    assert storage_bytes_for(n, blocksize, double_quant) == held == storage_bytes(state)
    state.absmax = state.absmax[:-1] if state.absmax.size > 1 else state.absmax.astype(np.float64)
    with pytest.raises(ValueError, match="state arrays hold"):
        storage_bytes(state)


def test_storage_bytes_formula_rejects_bad_sizes():
    for numel, blocksize in ((0, 64), (-3, 64), (2.5, 64), (True, 64), (100, 48)):
        with pytest.raises(ValueError, match="numel|blocksize"):
            storage_bytes_for(numel, blocksize)
