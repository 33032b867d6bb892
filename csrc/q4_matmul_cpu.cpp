// q4_matmul_cpu.cpp: torch.ops.q4lab.matmul_4bit on the CPU, y = x . W^T (+ bias) from packed codes.
//
// The specification is q4lab/reference/matmul.py (docs/format.md, "Fused matmul"); every float
// operation below is one of q4_matmul.h's, in the reference's order, so the bytes are the same for
// any thread count (threads split the output rows; each output is computed by one thread alone).
// Source of the idea: bitsandbytes' fused 4-bit GEMV (functional.py::gemv_4bit), which reads the
// packed weight once instead of dequantizing it; here the summation order is fixed by the spec.
//
// Three implementations of the same arithmetic, chosen at run time among those compiled in:
//   portable  any K: per row, 32 float lanes (lane = flat index mod 32), q4_mm_* per element.
//   avx2      K % 32 == 0: one chunk of 32 flat elements = 16 packed bytes -> 4 registers of 8 lanes
//             (even lanes from the high nibbles, odd lanes from the low ones); the 16-entry table
//             lookup is two 8-entry permutes and a blend on bit 3 (as q4_cpu_avx2.h's lookup32).
//   avx512    K % 32 == 0: the same chunk in 2 registers of 16 lanes; one vpermps is the lookup.
// In both SIMD forms x is first copied into a "deinterleaved" buffer (per chunk: the 16 even
// elements, then the 16 odd ones) so that each register of products meets the inputs of its lanes.
// The SIMD forms run several rows at once (independent accumulation chains, shared x loads).
// The weight is never dequantized; nested absmax codes are decoded block by block (q4_block_absmax).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <atomic>
#include <string>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include "q4_dtype.h"
#include "q4_matmul_checks.h"

namespace q4lab {
namespace {

struct MatmulPlan {
  const uint8_t* packed;
  Q4AbsmaxSource absmax;
  Q4Codebook cb;
  const Q4Dynamic* dyn;
  int64_t N, K, B;
  int log2b;  // B = 2^log2b: block indices by shifts, never a division in the loops
};

// ---- portable: any shape -------------------------------------------------------------------
float row_portable(const MatmulPlan& p, const float* x, int64_t o) {
  float acc[Q4_MM_LANES];
  for (int l = 0; l < Q4_MM_LANES; ++l) acc[l] = 0.0f;
  const int64_t begin = o * p.K, end = begin + p.K;
  for (int64_t e = begin; e < end;) {
    const int64_t b = e >> p.log2b, seg_end = std::min(end, (b + 1) << p.log2b);
    float s[Q4_MM_LANES];
    for (int l = 0; l < Q4_MM_LANES; ++l) s[l] = 0.0f;
    for (; e < seg_end; ++e) {
      const uint32_t l = q4_mm_lane(e);
      s[l] = q4_mm_add(s[l], q4_mm_product(p.cb, q4_code_at(p.packed, e), x[e - begin]));
    }
    const float a = q4_block_absmax(p.absmax, *p.dyn, b);
    for (int l = 0; l < Q4_MM_LANES; ++l) acc[l] = q4_mm_scale_add(acc[l], a, s[l]);
  }
  return q4_mm_lane_tree(acc);
}

// x row (K floats) -> per chunk of 32: the 16 even elements, then the 16 odd ones (K % 32 == 0).
void deinterleave(const float* x, int64_t K, float* xd) {
  for (int64_t c = 0; c < K; c += Q4_MM_LANES)
    for (int j = 0; j < 16; ++j) {
      xd[c + j] = x[c + 2 * j];
      xd[c + 16 + j] = x[c + 2 * j + 1];
    }
}

// Length of the segment starting at column k of a row whose first flat index is `row_begin`: up to
// the end of the row or of the block, whichever comes first (a multiple of 32 when K % 32 == 0).
inline int64_t segment_length(const MatmulPlan& p, int64_t row_begin, int64_t k) {
  return std::min(p.K - k, p.B - ((row_begin + k) & (p.B - 1)));
}

// Block of row o0 + r at column k, for R rows whose segments coincide (K % B == 0 when R > 1).
inline int64_t block_of(const MatmulPlan& p, int64_t o0, int r, int64_t k) {
  return ((o0 + r) * p.K + k) >> p.log2b;
}

#if defined(__AVX512F__)
// ---- avx512: R rows at once; R > 1 needs K % B == 0 (then every row has the same segments) ------
inline float tree_avx512(__m512 even, __m512 odd) {
  // lanes: even[j] = lane 2j, odd[j] = lane 2j + 1. Widths 16, 8, 4, 2 pair lanes of one parity;
  // width 1 adds lane 1 (odd[0]) to lane 0 (even[0]).
  const auto halve = [](__m512 v) {
    const __m256 w16 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 w8 = _mm_add_ps(_mm256_castps256_ps128(w16), _mm256_extractf128_ps(w16, 1));
    const __m128 w4 = _mm_add_ps(w8, _mm_movehl_ps(w8, w8));
    return _mm_add_ss(w4, _mm_shuffle_ps(w4, w4, 1));
  };
  return _mm_cvtss_f32(_mm_add_ss(halve(even), halve(odd)));
}

template <int R>
void rows_avx512(const MatmulPlan& p, const float* xd, int64_t o0, float* y) {
  const __m512 table = _mm512_loadu_ps(p.cb.value);
  __m512 acc_e[R], acc_o[R];
  for (int r = 0; r < R; ++r) acc_e[r] = acc_o[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K;) {
    const int64_t len = segment_length(p, o0 * p.K, k);
    __m512 s_e[R], s_o[R];
    for (int r = 0; r < R; ++r) s_e[r] = s_o[r] = _mm512_setzero_ps();
    for (int64_t c = k; c < k + len; c += Q4_MM_LANES) {
      const __m512 x_e = _mm512_loadu_ps(xd + c), x_o = _mm512_loadu_ps(xd + c + 16);
      for (int r = 0; r < R; ++r) {
        const uint8_t* bytes = p.packed + (((o0 + r) * p.K + c) >> 1);
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
        const __m512 v_e = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);  // high nibbles
        const __m512 v_o = _mm512_permutexvar_ps(d, table);  // low 4 bits of the index: low nibbles
        s_e[r] = _mm512_add_ps(s_e[r], _mm512_mul_ps(v_e, x_e));
        s_o[r] = _mm512_add_ps(s_o[r], _mm512_mul_ps(v_o, x_o));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(q4_block_absmax(p.absmax, *p.dyn, block_of(p, o0, r, k)));
      acc_e[r] = _mm512_add_ps(acc_e[r], _mm512_mul_ps(a, s_e[r]));
      acc_o[r] = _mm512_add_ps(acc_o[r], _mm512_mul_ps(a, s_o[r]));
    }
    k += len;
  }
  for (int r = 0; r < R; ++r) y[r] = tree_avx512(acc_e[r], acc_o[r]);
}
#endif

#if defined(__AVX2__)
// ---- avx2: R rows at once, 4 registers of 8 lanes per row ---------------------------------------
inline __m256 lookup16_f32(__m256 low, __m256 high, __m256i index) {
  const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                          _mm256_permutevar8x32_ps(high, index), pick);
}

inline float tree_avx2(const __m256* v) {  // v = even lanes 0-7, 8-15 of j; odd lanes likewise
  const auto halve = [](__m256 a, __m256 b) {
    const __m256 w16 = _mm256_add_ps(a, b);
    const __m128 w8 = _mm_add_ps(_mm256_castps256_ps128(w16), _mm256_extractf128_ps(w16, 1));
    const __m128 w4 = _mm_add_ps(w8, _mm_movehl_ps(w8, w8));
    return _mm_add_ss(w4, _mm_shuffle_ps(w4, w4, 1));
  };
  return _mm_cvtss_f32(_mm_add_ss(halve(v[0], v[1]), halve(v[2], v[3])));
}

template <int R>
void rows_avx2(const MatmulPlan& p, const float* xd, int64_t o0, float* y) {
  const __m256 low = _mm256_loadu_ps(p.cb.value), high = _mm256_loadu_ps(p.cb.value + 8);
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K;) {
    const int64_t len = segment_length(p, o0 * p.K, k);
    __m256 s[R][4];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) s[r][q] = _mm256_setzero_ps();
    for (int64_t c = k; c < k + len; c += Q4_MM_LANES) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* bytes = p.packed + (((o0 + r) * p.K + c) >> 1);
        for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+7: even lanes j = 8h.., odd lanes likewise
          const __m256i d = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * h)));
          const __m256 v_e = lookup16_f32(low, high, _mm256_srli_epi32(d, 4));
          const __m256 v_o = lookup16_f32(low, high, d);
          s[r][h] = _mm256_add_ps(s[r][h], _mm256_mul_ps(v_e, _mm256_loadu_ps(xd + c + 8 * h)));
          s[r][2 + h] = _mm256_add_ps(s[r][2 + h],
                                      _mm256_mul_ps(v_o, _mm256_loadu_ps(xd + c + 16 + 8 * h)));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_set1_ps(q4_block_absmax(p.absmax, *p.dyn, block_of(p, o0, r, k)));
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_add_ps(acc[r][q], _mm256_mul_ps(a, s[r][q]));
    }
    k += len;
  }
  for (int r = 0; r < R; ++r) y[r] = tree_avx2(acc[r]);
}
#endif

// ---- dispatch --------------------------------------------------------------------------------
enum class Isa { kPortable, kAvx2, kAvx512 };

std::vector<std::string> compiled_isas() {
  std::vector<std::string> isas{"portable"};
#if defined(__AVX2__)
  isas.push_back("avx2");
#endif
#if defined(__AVX512F__)
  isas.push_back("avx512");
#endif
  return isas;
}

Isa parse_isa(c10::string_view name) {
  const std::vector<std::string> isas = compiled_isas();
  const std::string wanted = name == "auto" ? isas.back() : std::string(name);
  for (const auto& isa : isas)
    if (isa == wanted)
      return wanted == "avx512" ? Isa::kAvx512 : wanted == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  std::string known;
  for (const auto& isa : isas) known += " " + isa;
  TORCH_CHECK(false, "q4lab: matmul_4bit isa='", std::string(name), "' is not compiled in here; "
              "use 'auto' or one of:", known);
}

// Rows [first, last) of the output for every input row, R rows at a time where the SIMD form
// allows it. `x` is float32 (M, K); `xd` its deinterleaved copy (SIMD forms only).
void compute_rows(const MatmulPlan& p, Isa isa, const float* x, const float* xd, int64_t M,
                  int64_t first, int64_t last, float* y) {
  const bool simd = isa != Isa::kPortable && p.K % Q4_MM_LANES == 0;
  const bool aligned_blocks = p.K % p.B == 0;  // every row has the same segments
  float out[4];
  for (int64_t o = first; o < last;) {
    int64_t rows = 1;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * p.K;
      const float* xdm = xd ? xd + m * p.K : nullptr;
      if (!simd) {
        out[0] = row_portable(p, xm, o);
      }
#if defined(__AVX512F__)
      else if (isa == Isa::kAvx512) {
        if (aligned_blocks && last - o >= 4) { rows_avx512<4>(p, xdm, o, out); rows = 4; }
        else rows_avx512<1>(p, xdm, o, out);
      }
#endif
#if defined(__AVX2__)
      else {
        if (aligned_blocks && last - o >= 2) { rows_avx2<2>(p, xdm, o, out); rows = 2; }
        else rows_avx2<1>(p, xdm, o, out);
      }
#endif
      for (int64_t r = 0; r < rows; ++r) y[m * p.N + o + r] = out[r];
    }
    o += rows;
  }
}

void matmul_4bit_out_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& absmax2,
                         const c10::optional<at::Tensor>& offset, int64_t blocksize,
                         c10::string_view quant_type, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, c10::string_view isa_name,
                         at::Tensor& out) {
  const MatmulShape shape = check_matmul_args(x, packed, absmax, absmax2, offset, blocksize,
                                              out_features, bias);
  check_matmul_out(out, x, shape);
  const Isa isa = parse_isa(isa_name);
  if (shape.M == 0) return;
  int log2b = 0;
  while ((int64_t(1) << log2b) < blocksize) ++log2b;
  const MatmulPlan p{packed.data_ptr<uint8_t>(), absmax_source(absmax, absmax2, offset),
                     q4_make_codebook(parse_quant_type(quant_type)), &q4_dynamic(), shape.N,
                     shape.K, blocksize, log2b};
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // fp16/bf16 -> float32 is exact
  const float* xs = xf.data_ptr<float>();
  std::vector<float> xd;
  if (isa != Isa::kPortable && p.K % Q4_MM_LANES == 0) {
    xd.resize(shape.M * p.K);
    for (int64_t m = 0; m < shape.M; ++m) deinterleave(xs + m * p.K, p.K, xd.data() + m * p.K);
  }
  at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty({shape.M, shape.N}, xf.options());
  float* ys = y.data_ptr<float>();
  // About 64K weights per task, in whole groups of 4 rows (the SIMD forms' widest group).
  const int64_t rows_per_task = std::max<int64_t>(4, ((1 << 16) / p.K + 3) / 4 * 4);
  const int64_t ntasks = ceil_div(shape.N, rows_per_task);
  q4_parallel_chunks(ntasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t)
      compute_rows(p, isa, xs, xd.empty() ? nullptr : xd.data(), shape.M, t * rows_per_task,
                   std::min(shape.N, (t + 1) * rows_per_task), ys);
  });
  if (bias.has_value()) {
    const at::Tensor bias_f32 = bias->to(at::kFloat);  // fp16/bf16 -> float32 is exact
    const float* b = bias_f32.data_ptr<float>();
    for (int64_t m = 0; m < shape.M; ++m)
      for (int64_t o = 0; o < shape.N; ++o) ys[m * shape.N + o] = q4_mm_add(ys[m * shape.N + o], b[o]);
  }
  if (!y.is_same(out)) out.copy_(y);  // float32 -> fp16/bf16, round to nearest even
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(q4lab, m) {
  m.def("matmul_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? offset, "
        "int blocksize, str quant_type, int out_features, Tensor? bias, str isa=\"auto\") -> Tensor");
  m.def("matmul_4bit_out(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? offset, "
        "int blocksize, str quant_type, int out_features, Tensor? bias, str isa, Tensor(a!) out) -> ()");
  m.def("matmul_4bit_isas() -> str[]", [] { return compiled_isas(); });
}

TORCH_LIBRARY_IMPL(q4lab, CPU, m) { Q4MatmulOps<&matmul_4bit_out_cpu>::register_impls(m); }

}  // namespace q4lab
