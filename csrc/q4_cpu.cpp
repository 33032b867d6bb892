// q4_cpu.cpp: the torch.ops.q4lab schemas (TORCH_LIBRARY) and their CPU implementation.
//
// Same steps as q4lab/reference (docs/format.md §1-§8), with the per-element math from q4_element.h:
//   quantize_4bit      blockwise absmax -> reciprocal -> scale -> encode -> pack
//                      (bitsandbytes functional.py::quantize_4bit, kernels.cu::kQuantizeBlockwise)
//   quantize_absmax    exact-mean offset -> center -> absmax per 256 -> scale -> 8-bit code
//                      (QLoRA section 3 "Double Quantization"; bnb quantize_4bit(compress_statistics))
//   dequantize_absmax  absmax = RN(RN(dyn[q] * absmax2) + offset)
//   dequantize_4bit    out = RN(table[code] * absmax), then RNE to fp16/bf16
// Blocks are independent: q4_parallel_chunks (q4_dtype.h) hands runs of whole blocks to threads,
// and the loops inside a block are fixed-trip loops the compiler vectorizes (-O3 -march=native
// -ffp-contract=off, never -ffast-math; check with -fopt-info-vec). On AVX2 machines two inner loops
// use the intrinsics of q4_cpu_avx2.h (same results). Each op is written once, as its `_out` form
// writing into given tensors (the tests poison those buffers to prove every byte is written); the
// allocating form and the registration are q4_checks.h's Q4Ops (CpuOps). Indexing is 64-bit.
#include <torch/library.h>
#include <cstring>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include "q4_checks.h"
#include "q4_cpu_avx2.h"
#include "q4_dtype.h"

namespace q4lab {
namespace {

constexpr int64_t kMaxBlock = Q4_MAX_BLOCKSIZE;

// at::empty, plus (Linux) a transparent-huge-page hint for outputs of 4 MiB and more, given before
// the first write: a fresh 32 MiB output otherwise costs 8192 page faults, which on a VM take
// longer than the dequantization itself. The values written are unaffected.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.nbytes() >= (4u << 20) && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
  return t;
}
constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, about 128 KiB of float32

// Steps 4-6 for 32 scaled elements (blocksizes are multiples of 32): fixed-trip loops that the
// compiler vectorizes. `v` holds the float32 inputs, `out` gets 16 packed bytes. With AVX2, nf4 and
// int4 use the 4-compare binary search of q4_cpu_avx2.h (same counts, see there).
constexpr int kSub = 32;

struct Encoder {
  const Q4Codebook& cb;
  float t[Q4_MAX_THRESHOLDS];  // a local copy: the compiler keeps it in registers
#if defined(__AVX2__)
  Q4TreeAvx2 tree;
  explicit Encoder(const Q4Codebook& c) : cb(c), tree(c.threshold) { copy(); }
#else
  explicit Encoder(const Q4Codebook& c) : cb(c) { copy(); }
#endif
  void copy() { for (int k = 0; k < Q4_MAX_THRESHOLDS; ++k) t[k] = cb.threshold[k]; }
};

// q4_encode in two loops: the ranks (fixed-trip compares, vectorized), then the codes (fp4: a table
// lookup and the sign bit; nf4/int4: the rank itself). Same function as q4_encode, split so the
// first loop vectorizes.
template <bool kFP4>
inline void encode_pack32(const float* v, Q4Scale s, const Encoder& enc, uint8_t* out) {
#if defined(__AVX2__)
  if (!kFP4) {
    encode_pack32_avx2(v, s, enc.tree, out);
    return;
  }
#endif
  uint32_t rank[kSub];  // 32-bit counts: the compare masks add up without narrowing
  for (int i = 0; i < kSub; ++i) rank[i] = q4_encode_rank(enc.t, kFP4, q4_scale(v[i], s));
  uint8_t code[kSub];
  for (int i = 0; i < kSub; ++i) code[i] = q4_encode_code(enc.cb, rank[i], v[i]);
  for (int j = 0; j < kSub / 2; ++j) out[j] = q4_pack(code[2 * j], code[2 * j + 1]);
}

// Steps 1-6 for one block of `valid` (<= blocksize) elements; `packed` gets ceil(valid / 2) bytes.
// A short tail block is copied into a zero-padded buffer first (padding never raises the absmax);
// an odd n ends with the zero code as its pad nibble (docs/format.md §6).
template <class D, bool kFP4>
void quantize_block(const typename D::T* x, int64_t valid, int64_t blocksize,
                    const Encoder& enc, uint8_t* packed, float* absmax_out) {
  if (valid < blocksize) {
    alignas(64) float buf[kMaxBlock];
    alignas(64) uint8_t bytes[kMaxBlock / 2];
    for (int64_t i = 0; i < valid; ++i) buf[i] = D::load(x[i]);
    for (int64_t i = valid; i < blocksize; ++i) buf[i] = 0.0f;
    quantize_block<Q4F32, kFP4>(buf, blocksize, blocksize, enc, bytes, absmax_out);
    for (int64_t j = 0; j < valid / 2; ++j) packed[j] = bytes[j];
    if (valid & 1) packed[valid / 2] = q4_pack(bytes[valid / 2] >> 4, enc.cb.zero_code);
    return;
  }
  uint32_t max_bits = 0;
  for (int64_t u = 0; u < blocksize; u += kSub)
    for (int i = 0; i < kSub; ++i) max_bits = q4_max_bits(max_bits, q4_abs_bits(D::load(x[u + i])));
  const float absmax = q4_float(max_bits);
  *absmax_out = absmax;
  const Q4Scale s = q4_reciprocal_scale(absmax);
  alignas(64) float v[kSub];
  for (int64_t u = 0; u < blocksize; u += kSub) {
    for (int i = 0; i < kSub; ++i) v[i] = D::load(x[u + i]);
    encode_pack32<kFP4>(v, s, enc, packed + u / 2);
  }
}

template <class D, bool kFP4>
void quantize_all(const at::Tensor& flat, int64_t blocksize, const Q4Codebook& cb,
                  uint8_t* packed, float* absmax) {
  const auto* x = reinterpret_cast<const typename D::T*>(flat.data_ptr());
  const int64_t n = flat.numel(), nblocks = ceil_div(n, blocksize);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / blocksize);
  const Encoder enc(cb);
  q4_parallel_chunks(nblocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t lo = b * blocksize, valid = std::min(blocksize, n - lo);
      quantize_block<D, kFP4>(x + lo, valid, blocksize, enc, packed + lo / 2, absmax + b);
    }
  });
}

void quantize_4bit_out_cpu(const at::Tensor& flat, int64_t blocksize, c10::string_view quant_type,
                           at::Tensor& packed, at::Tensor& absmax) {
  check_quantize_out(flat, blocksize, packed, absmax);
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  auto* p = packed.data_ptr<uint8_t>();
  auto* a = absmax.data_ptr<float>();
  q4_dispatch_dtype(flat.scalar_type(), [&](auto dtype) {
    using D = decltype(dtype);
    if (cb.is_fp4) quantize_all<D, true>(flat, blocksize, cb, p, a);
    else quantize_all<D, false>(flat, blocksize, cb, p, a);
  });
}

// ---- double quantization -------------------------------------------------------------------
// Offset = exact mean: integer exponent bins per chunk (any split gives the same sums), added up,
// then rounded once by q4_mean_from_bins.
float exact_mean_cpu(const float* absmax, int64_t count) {
  const int64_t chunk = 1 << 16, nchunks = ceil_div(count, chunk);
  std::vector<uint64_t> partial(nchunks * Q4_EXPONENT_BINS, 0);
  q4_parallel_chunks(nchunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      uint64_t* bins = partial.data() + c * Q4_EXPONENT_BINS;
      for (int64_t i = c * chunk; i < std::min(count, (c + 1) * chunk); ++i)
        bins[q4_bin_of(absmax[i])] += q4_bin_mantissa(absmax[i]);
    }
  });
  uint64_t bins[Q4_EXPONENT_BINS] = {0};
  for (int64_t c = 0; c < nchunks; ++c)
    for (int e = 0; e < Q4_EXPONENT_BINS; ++e) bins[e] += partial[c * Q4_EXPONENT_BINS + e];
  TORCH_CHECK(bins[Q4_EXPONENT_BINS - 1] == 0, "q4lab: absmax contains NaN or Inf; the offset needs finite values");
  return q4_mean_from_bins(bins, (uint64_t)count);
}

void quantize_absmax_out_cpu(const at::Tensor& absmax, const c10::optional<at::Tensor>& offset,
                             at::Tensor& codes, at::Tensor& absmax2, at::Tensor& offset_out) {
  const int64_t count = check_quantize_absmax_out(absmax, offset, codes, absmax2, offset_out);
  const int64_t ngroups = ceil_div(count, kNestedBlocksize);
  const float* a = absmax.data_ptr<float>();
  const float off = offset.has_value() ? offset->contiguous().data_ptr<float>()[0]
                                       : exact_mean_cpu(a, count);
  offset_out.data_ptr<float>()[0] = off;
  const Q4Dynamic& dyn = q4_dynamic();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* a2 = absmax2.data_ptr<float>();
  q4_parallel_chunks(ngroups, 16, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      const int64_t lo = g * kNestedBlocksize, hi = std::min(count, lo + kNestedBlocksize);
      float xn[kNestedBlocksize];
      uint32_t max_bits = 0;
      for (int64_t i = lo; i < hi; ++i) {
        xn[i - lo] = a[i] - off;  // centered
        max_bits = q4_max_bits(max_bits, q4_abs_bits(xn[i - lo]));
      }
      a2[g] = q4_float(max_bits);
      const Q4Scale s = q4_reciprocal_scale(a2[g]);
      for (int64_t i = lo; i < hi; ++i)
        q[i] = q4_encode_absmax_code(dyn, q4_scale(xn[i - lo], s), a2[g], off);
    }
  });
}

void dequantize_absmax_out_cpu(const at::Tensor& codes, const at::Tensor& absmax2,
                               const at::Tensor& offset, at::Tensor& out) {
  check_dequantize_absmax_out(codes, absmax2, offset, out);
  const Q4Dynamic& dyn = q4_dynamic();
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const float* a2 = absmax2.data_ptr<float>();
  const float off = offset.contiguous().data_ptr<float>()[0];
  float* o = out.data_ptr<float>();
  q4_parallel_chunks(codes.numel(), kGrainElements, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i)
      o[i] = q4_decode_absmax(dyn, q[i], a2[i / kNestedBlocksize], off);
  });
}

// ---- dequantize ----------------------------------------------------------------------------
// Per block: the 16 products table[c] * absmax, rounded and converted once, then a byte -> two
// outputs lookup (the same values an element-wise multiply gives, computed 16 times per block).
#if defined(__AVX2__)
inline void lookup_avx2(const uint16_t* level, const uint8_t* p, uint16_t* o) { lookup16_avx2(level, p, o); }
inline void lookup_avx2(const float* level, const uint8_t* p, float* o) { lookup32_avx2(level, p, o); }
#endif

template <class D>
void dequantize_all(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t n,
                    const Q4Codebook& cb, typename D::T* out) {
  const int64_t nblocks = ceil_div(n, blocksize);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / blocksize);
  q4_parallel_chunks(nblocks, grain, [&](int64_t first, int64_t last) {
    typename D::T level[Q4_CODES];
    for (int64_t b = first; b < last; ++b) {
      for (int c = 0; c < Q4_CODES; ++c) level[c] = D::store(q4_decode(cb, c, absmax[b]));
      const int64_t lo = b * blocksize, hi = std::min(n, lo + blocksize);
      const int64_t pairs = (hi - lo) / 2;
      const uint8_t* p = packed + lo / 2;
      typename D::T* o = out + lo;
      int64_t j = 0;
#if defined(__AVX2__)
      for (; j + 16 <= pairs; j += 16) lookup_avx2(level, p + j, o + 2 * j);
#endif
      for (; j < pairs; ++j) {
        o[2 * j] = level[p[j] >> 4];
        o[2 * j + 1] = level[p[j] & 15];
      }
      if ((hi - lo) & 1) o[2 * pairs] = level[p[pairs] >> 4];
    }
  });
}

void dequantize_4bit_out_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                             c10::string_view quant_type, int64_t n, at::Tensor& out) {
  const Q4Codebook cb = check_dequantize_out(packed, absmax, blocksize, quant_type, n, out);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  q4_dispatch_dtype(out.scalar_type(), [&](auto dtype) {
    using D = decltype(dtype);
    dequantize_all<D>(p, a, blocksize, n, cb, reinterpret_cast<typename D::T*>(out.data_ptr()));
  });
}

using CpuOps = Q4Ops<quantize_4bit_out_cpu, quantize_absmax_out_cpu, dequantize_absmax_out_cpu,
                    dequantize_4bit_out_cpu, empty_large>;

}  // namespace

TORCH_LIBRARY(q4lab, m) {
  m.def("quantize_4bit(Tensor flat, int blocksize, str quant_type) -> (Tensor, Tensor)");
  m.def("quantize_4bit_out(Tensor flat, int blocksize, str quant_type, Tensor(a!) packed, "
        "Tensor(b!) absmax) -> ()");
  m.def("quantize_absmax(Tensor absmax, Tensor? offset) -> (Tensor, Tensor, Tensor)");
  m.def("quantize_absmax_out(Tensor absmax, Tensor? offset, Tensor(a!) codes, "
        "Tensor(b!) absmax2, Tensor(c!) offset_out) -> ()");
  m.def("dequantize_absmax(Tensor codes, Tensor absmax2, Tensor offset) -> Tensor");
  m.def("dequantize_absmax_out(Tensor codes, Tensor absmax2, Tensor offset, Tensor(a!) out) -> ()");
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, int n, "
        "ScalarType dtype) -> Tensor");
  m.def("dequantize_4bit_out(Tensor packed, Tensor absmax, int blocksize, str quant_type, int n, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(q4lab, CPU, m) { CpuOps::register_impls(m); }

}  // namespace q4lab
