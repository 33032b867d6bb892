"""Codebooks and thresholds against their published values, bit for bit.

Oracles: the NF4 / FP4 float32 hex tables of bitsandbytes ``get_4bit_type`` and the 256-entry
``create_dynamic_map()`` table (docs/format.md, "The tables"; read from bnb 0.50.2), the float32
thresholds compiled into bnb's CUDA ``dQuantizeNF4`` (docs/bitsandbytes.md §3, from SASS), and real
bitsandbytes.
"""
from fractions import Fraction

import numpy as np
import pytest

from q4lab import reference as ref
from q4lab.reference.codebooks import exact_midpoint_f32, torch_linspace_f32, zero_code
from q4lab.testing import assert_bytes_equal

NF4_PUBLISHED = [0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F,
                 0xBDBA7871, 0x00000000, 0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A,
                 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000]
FP4_MAGNITUDES_PUBLISHED = [0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB,
                            0x3F000000, 0x3E2AAAAB, 0x3E800000]
# bnb CUDA dQuantizeNF4 thresholds as compiled (decimal literals rounded once to float32).
NF4_CUDA_THRESHOLDS = [0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC,
                       0xBD3A7871, 0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9,
                       0x3F006D03, 0x3F248DAF, 0x3F5C89D9]
DYNAMIC_PUBLISHED = " ".join([
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000",
    "bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333",
    "bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666",
    "bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a",
    "bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a",
    "bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000",
    "bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd",
    "be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334",
    "bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a",
    "bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d",
    "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148",
    "bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148",
    "bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4",
    "bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d",
    "ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b",
    "b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000",
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b",
    "398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d",
    "3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4",
    "3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148",
    "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148",
    "3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d",
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a",
    "3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334",
    "3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd",
    "3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000",
    "3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a",
    "3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a",
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666",
    "3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333",
    "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000",
    "3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000",
])


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def hex_table(values):
    return np.array(values, dtype=np.uint32).view(np.float32)


def test_nf4_derived_from_scipy_equals_published_table():
    assert_bytes_equal(hex_table(NF4_PUBLISHED), ref.nf4_codebook(), "nf4 codebook")


def test_nf4_shape_of_the_shipped_recipe():
    nf4 = ref.nf4_codebook()
    assert (np.diff(nf4) > 0).all() and nf4[0] == -1.0 and nf4[15] == 1.0
    assert bits(nf4[7]) == 0  # exactly +0.0
    assert (nf4 < 0).sum() == 7 and (nf4 > 0).sum() == 8  # asymmetric: 7 negative, 8 positive


def test_seed_recipe_of_midpoints_of_2k_plus_1_quantiles_is_not_what_ships():
    """The textbook recipe (midpoints of 17 equal-probability quantiles) is symmetric and misses
    the published values; the test documents by how much."""
    from scipy.stats import norm

    q = norm.ppf(np.linspace(0, 1, 18)[1:-1])  # 16 interior quantiles of 17 bins
    seed = (q / np.abs(q).max()).astype(np.float32)
    differing = int((bits(seed) != bits(ref.nf4_codebook())).sum())
    assert differing >= 14, differing
    assert not (seed == 0).any()  # no exact zero in the seed recipe


def test_fp4_equals_published_table_in_bit_order():
    fp4 = ref.fp4_codebook()
    assert_bytes_equal(hex_table(FP4_MAGNITUDES_PUBLISHED), fp4[:8], "fp4 magnitudes")
    assert_bytes_equal(-fp4[9:], fp4[1:8], "fp4 negative half")
    assert bits(fp4[8]) == 0  # index 8 is +0.0, as in bnb's get_4bit_type
    assert list(ref.fp4_magnitude_order()) == [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010,
                                               0b011]


def test_dynamic_map_derived_equals_published_table():
    published = np.array([int(h, 16) for h in DYNAMIC_PUBLISHED.split()], dtype=np.uint32)
    assert published.size == 256
    assert_bytes_equal(published.view(np.float32), ref.dynamic_map(), "dynamic map")
    d = ref.dynamic_map()
    assert d[127] == 0.0 and d[255] == 1.0 and d[0] > -1.0  # asymmetric: no -1.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", "dynamic"])
def test_thresholds_are_float32_rounded_exact_midpoints(quant_type):
    t = ref.thresholds(quant_type)
    if quant_type == "nf4":
        levels = ref.nf4_codebook()
    elif quant_type == "fp4":
        levels = np.sort(ref.fp4_codebook()[:8])
    elif quant_type == "int4":
        levels = ref.int4_codebook()[:15]
    else:
        levels = ref.dynamic_map()
    assert t.size == levels.size - 1 and (np.diff(t) > 0).all()
    for k, tk in enumerate(t):
        exact = (Fraction(float(levels[k])) + Fraction(float(levels[k + 1]))) / 2
        err = abs(Fraction(float(tk)) - exact)
        below = abs(Fraction(float(np.nextafter(tk, np.float32(-2)))) - exact)
        above = abs(Fraction(float(np.nextafter(tk, np.float32(2)))) - exact)
        assert err <= below and err <= above, (quant_type, k)
        if err == below or err == above:  # exact tie between two float32: even significand wins
            assert bits(tk) % 2 == 0, (quant_type, k)


def test_nf4_thresholds_differ_from_bnb_cuda_literals_at_exactly_four_places():
    ours = bits(ref.thresholds("nf4"))
    cuda = np.array(NF4_CUDA_THRESHOLDS, dtype=np.uint32)
    differ = np.flatnonzero(ours != cuda)
    assert list(differ) == [0, 8, 12, 14]
    # and each by one float32 step
    assert (np.abs(ours[differ].astype(np.int64) - cuda[differ].astype(np.int64)) == 1).all()


def test_exact_midpoint_rounds_once():
    a, b = np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2))
    m = exact_midpoint_f32(a, b)  # exactly halfway between two float32: ties to even (1.0)
    assert m == np.float32(1.0)


def test_int4_is_uniform_for_comparison():
    t = ref.int4_codebook()
    assert t.size == 16 and t[7] == 0.0 and t[0] == -1.0 and t[14] == 1.0 and t[15] == 1.0


def test_torch_linspace_emulation_matches_torch():
    torch = pytest.importorskip("torch")
    for start, end in ((0.9677083, 0.5), (0.1, 1.0), (-3.3, 7.25)):
        for steps in (2, 3, 7, 8, 9, 16, 17, 33, 65, 129, 1000):
            expected = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
            assert_bytes_equal(expected, torch_linspace_f32(start, end, steps),
                               f"linspace({start}, {end}, {steps})")


def test_tables_equal_real_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    assert_bytes_equal(bnbf.get_4bit_type("nf4", device="cpu"), ref.nf4_codebook(), "nf4")
    assert_bytes_equal(bnbf.get_4bit_type("fp4", device="cpu"), ref.fp4_codebook(), "fp4")
    assert_bytes_equal(bnbf.create_dynamic_map(), ref.dynamic_map(), "dynamic map")
    normal = bnbf.create_normal_map().numpy()
    assert_bytes_equal(np.concatenate([normal[:8], normal[-8:]]), ref.nf4_codebook(), "normal map")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_zero_code_is_the_level_zero_and_what_zero_encodes_to(quant_type):
    """``constants.ZERO_CODES`` (also generated into csrc/q4_tables.h, where the kernels pad odd
    lengths with it) names the level +0.0 of each table, and 0.0 and -0.0 encode to it."""
    code = zero_code(quant_type)
    table = ref.codebook(quant_type)
    assert table[code] == 0.0 and not np.signbit(table[code]), (quant_type, code, table[code])
    packed, _ = ref.quantize_4bit(np.array([1.0, 0.0, -0.0], np.float32), 32, quant_type, False)
    assert packed[0] & 0x0F == code and packed[1] >> 4 == code and packed[1] & 0x0F == code
