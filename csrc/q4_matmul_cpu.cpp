// q4_matmul_cpu.cpp: torch.ops.q4lab.matmul_4bit on the CPU, y = x . W^T (+ bias) from packed codes.
//
// The specification is q4lab/reference/matmul.py, summation order pair-chain-v2 (docs/format.md,
// "Fused matmul"): per output row and block one chain s = RN(s + q) over byte terms
// q = RN(p[2j] + p[2j+1]), then acc = RN(acc + RN(absmax * s)) block by block. Every float
// operation below is one of q4_matmul.h's, in that order, so the bytes are the same for any thread
// count (threads split the output rows; each output is computed by one thread alone) and any form.
// Source of the idea: bitsandbytes' fused 4-bit GEMV (functional.py::gemv_4bit), which reads the
// packed weight once instead of dequantizing it; here the summation order is fixed by the spec.
//
// Three forms of the same arithmetic, chosen at run time among those compiled here:
//   portable  any shape: one row at a time, q4_mm_segment_sum per segment.
//   table     K % B == 0, the stored bytes: per input row, a 256-entry table per byte column j,
//             T_j[byte] = RN(RN(t[byte>>4]*x[2j]) + RN(t[byte&15]*x[2j+1])), is built once
//             (threads split the columns); then each stored byte is ONE load + ONE add of its row's
//             chain (movzx, shr, addss-from-memory per two weights, 8 rows interleaved), blocks
//             outer so that a block's 32 KiB of tables stays in L1. Reads bitsandbytes' bytes in
//             place: the form for a weight seen once (an FSDP all-gather, a first call).
//   rows      K % B == 0, AVX2, the decode layout (csrc/q4_matmul_rows.cpp): 32 output rows per
//             step, byte-plane lookups with vpshufb; given the stored bytes it runs `table`.
//   permute   K % B == 0, AVX-512F, the decode layout (csrc/q4_matmul_permute.cpp): 16 output rows
//             per register, one vpermps per 16 products; built from the same source everywhere
//             (slow without AVX-512: listed second there, so that 'auto' never picks it).
// 'auto' is the last form listed by compiled_isas(). Nested absmax codes are decoded block by
// block (the decode layout carries them decoded).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <cstring>
#include <string>
#include <vector>
#include "q4_dtype.h"
#include "q4_matmul_checks.h"
#include "q4_matmul_rows.h"

namespace q4lab {
namespace {

struct MatmulPlan {
  const uint8_t* packed;
  Q4AbsmaxSource absmax;
  Q4Codebook cb;
  const Q4Dynamic* dyn;
  int64_t N, K, B;
  int log2b;  // B = 2^log2b: block indices by shifts, never a division in the loops
  // Where row o's bytes of block b start: packed + b * block_stride + o * row_bytes (the stored
  // layout: block_stride = B/2, row_bytes = K/2).
  int64_t block_stride, row_bytes;
};

// ---- portable: any shape -------------------------------------------------------------------
struct RowInput {
  const float* x;
  float operator()(int64_t k) const { return x[k]; }
};

float row_portable(const MatmulPlan& p, const float* x, int64_t o) {
  float acc = 0.0f;
  const int64_t begin = o * p.K, end = begin + p.K;
  for (int64_t e = begin; e < end;) {
    const int64_t b = e >> p.log2b, seg_end = std::min(end, (b + 1) << p.log2b);
    const float s = q4_mm_segment_sum(p.cb, p.packed, begin, e, seg_end, RowInput{x});
    acc = q4_mm_scale_add(acc, q4_block_absmax(p.absmax, *p.dyn, b), s);
    e = seg_end;
  }
  return acc;
}

// ---- table: K % B == 0 -------------------------------------------------------------------------
constexpr int kTableEntries = 256;  // one per byte value: (high code, low code)
constexpr int kTableRows = 8;       // independent chains in flight (addss latency x throughput)
// Layers below this many weights per thread run on fewer threads (a thread's wake-up must pay off).
constexpr int64_t kMinWeightsPerThread = 1 << 18;

// Tables of byte columns [j0, j1) of one input row: T[j][byte] = RN(p_hi + p_lo).
void build_pair_tables(const Q4Codebook& cb, const float* x, int64_t j0, int64_t j1, float* T) {
  for (int64_t j = j0; j < j1; ++j) {
    float hi[Q4_CODES], lo[Q4_CODES];
    for (int v = 0; v < Q4_CODES; ++v) {
      hi[v] = q4_mm_product(cb, v, x[2 * j]);
      lo[v] = q4_mm_product(cb, v, x[2 * j + 1]);
    }
    float* t = T + j * kTableEntries;
    for (int a = 0; a < Q4_CODES; ++a)
      for (int b = 0; b < Q4_CODES; ++b) t[a * Q4_CODES + b] = q4_mm_add(hi[a], lo[b]);
  }
}

inline uint64_t load8(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// The block sums s of R rows (stride `row_bytes` apart) over one block of `words` 8-byte words
// (WORDS > 0: a compile-time count, fully unrolled, so every table address is a constant
// displacement: movzx, shr, addss per byte); T = the tables of the block's first byte column.
// s starts with the first term (the reference's docstring: the same bytes as starting at +0.0).
template <int R, int WORDS>
inline void table_tile(const float* T, const uint8_t* w, int64_t row_bytes, int64_t words,
                       float* out) {
  if (WORDS > 0) words = WORDS;
  float s[R];
  uint64_t c[R];
  for (int r = 0; r < R; ++r) {
    c[r] = load8(w + r * row_bytes);
    s[r] = T[c[r] & 255];
    c[r] >>= 8;
  }
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i)
    for (int r = 0; r < R; ++r) {
      s[r] = q4_mm_add(s[r], T[i * kTableEntries + (c[r] & 255)]);
      c[r] >>= 8;
    }
#pragma GCC unroll 16
  for (int64_t q = 1; q < words; ++q) {
    const float* Tq = T + q * 8 * kTableEntries;
    for (int r = 0; r < R; ++r) c[r] = load8(w + r * row_bytes + 8 * q);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      for (int r = 0; r < R; ++r) {
        s[r] = q4_mm_add(s[r], Tq[i * kTableEntries + (c[r] & 255)]);
        c[r] >>= 8;
      }
  }
  for (int r = 0; r < R; ++r) out[r] = s[r];
}

// Rows [first, last) of one input row's output y (float32, the row accumulators), blocks outer.
template <int WORDS>
void table_rows(const MatmulPlan& p, const float* T, int64_t first, int64_t last, float* y) {
  const int64_t row_bytes = p.row_bytes, block_bytes = p.B / 2, words = p.B / 16;
  const int64_t nb = p.K >> p.log2b;
  for (int64_t o = first; o < last; ++o) y[o] = 0.0f;
  float s[kTableRows];
  for (int64_t b = 0; b < nb; ++b) {
    const float* Tb = T + b * block_bytes * kTableEntries;
    const uint8_t* base = p.packed + b * p.block_stride;
    int64_t o = first;
    for (; o + kTableRows <= last; o += kTableRows) {
      for (int r = 0; r < kTableRows && o + 2 * kTableRows + r < last; ++r)
        __builtin_prefetch(base + (o + 2 * kTableRows + r) * row_bytes);
      table_tile<kTableRows, WORDS>(Tb, base + o * row_bytes, row_bytes, words, s);
      for (int r = 0; r < kTableRows; ++r)
        y[o + r] = q4_mm_scale_add(y[o + r], q4_block_absmax(p.absmax, *p.dyn, (o + r) * nb + b),
                                   s[r]);
    }
    for (; o < last; ++o) {
      table_tile<1, WORDS>(Tb, base + o * row_bytes, row_bytes, words, s);
      y[o] = q4_mm_scale_add(y[o], q4_block_absmax(p.absmax, *p.dyn, o * nb + b), s[0]);
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------
enum class Isa { kPortable, kTable, kRows, kPermute };

// Every form compiled here, the one 'auto' picks last: permute where it is native, else rows
// where AVX2 is, else table (a permute that is not native comes second, never last).
std::vector<std::string> compiled_isas() {
  std::vector<std::string> isas{"portable"};
  if (!permute_form_native()) isas.push_back("permute");
  isas.push_back("table");
  if (rows_form_available()) isas.push_back("rows");
  if (permute_form_native()) isas.push_back("permute");
  return isas;
}

Isa parse_isa(c10::string_view name) {
  const std::vector<std::string> isas = compiled_isas();
  const std::string wanted = name == "auto" ? isas.back() : std::string(name);
  for (const auto& isa : isas)
    if (isa == wanted)
      return wanted == "rows" ? Isa::kRows : wanted == "permute" ? Isa::kPermute
             : wanted == "table" ? Isa::kTable : Isa::kPortable;
  std::string known;
  for (const auto& isa : isas) known += " " + isa;
  TORCH_CHECK(false, "q4lab: matmul_4bit isa='", std::string(name), "' is not available on this "
              "CPU; use 'auto' or one of:", known);
}

// Runs f(first, last) over [0, n) split into contiguous ranges, one per thread (a range of the
// output rows or of the table columns: which thread computes a value never changes its bytes).
template <class F>
void split(int64_t n, int64_t grain, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (n <= grain || threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  const int64_t chunk = ceil_div(ceil_div(n, threads), grain) * grain;
  at::parallel_for(0, ceil_div(n, chunk), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t * chunk, std::min(n, (t + 1) * chunk));
  });
}

// The float32 rows y (M, N) without bias.
void compute(const MatmulPlan& p, Isa isa, const float* x, int64_t M, float* y) {
  const bool fast = p.K % p.B == 0;  // every row has the same blocks (then K is even)
  // On the stored bytes the forms of the decode layout run `table`.
  if (!fast || isa == Isa::kPortable) {
    split(p.N, 16, [&](int64_t first, int64_t last) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = first; o < last; ++o) y[m * p.N + o] = row_portable(p, x + m * p.K, o);
    });
    return;
  }
  // The tables live in a buffer of the calling thread, reused across calls (no allocation per
  // token once it has grown): K/2 KiB per input row.
  thread_local std::vector<float> tables;
  const int64_t columns = p.K / 2;
  if ((int64_t)tables.size() < columns * kTableEntries) tables.resize(columns * kTableEntries);
  float* T = tables.data();
  // ONE parallel region per input row: the threads build the tables of their share of the
  // columns, meet at a barrier, then compute their share of the output rows (two regions cost
  // two wake-ups, and on a busy machine a wake-up can cost more than a small layer's work).
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(
      at::in_parallel_region() ? 1 : at::get_num_threads(),
      p.N * p.K / kMinWeightsPerThread));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * p.K;
    float* ym = y + m * p.N;
    const auto work = [&](int t, int nt, auto&& barrier) {
      const int64_t c_chunk = ceil_div(columns, nt), r_chunk = ceil_div(ceil_div(p.N, nt), 8) * 8;
      build_pair_tables(p.cb, xm, std::min(columns, t * c_chunk),
                        std::min(columns, (t + 1) * c_chunk), T);
      barrier();
      const int64_t first = std::min(p.N, t * r_chunk), last = std::min(p.N, (t + 1) * r_chunk);
      if (p.B == 64) table_rows<4>(p, T, first, last, ym);  // QLoRA's blocksize
      else table_rows<0>(p, T, first, last, ym);
    };
    if (threads == 1) {
      work(0, 1, [] {});
    } else {
#pragma omp parallel num_threads(threads)
      {
        const int nt = omp_get_num_threads();  // may be fewer than asked: every share still runs
        work(omp_get_thread_num(), nt, [] {
#pragma omp barrier
        });
      }
    }
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
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);  // exact
  at::Tensor y = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), xf.options());
  float* ys = y.data_ptr<float>();
  if (shape.rows) {
    TORCH_CHECK(isa == Isa::kRows || isa == Isa::kPermute, "q4lab: the decode layout "
                "(q4lab.matmul.repack_rows) is read by the 'rows' and 'permute' forms only; pass "
                "isa='auto' (where it picks one of them), 'rows' or 'permute', or the stored bytes");
    const RowsArgs args{packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), cb.value,
                        xf.data_ptr<float>(), shape.M, shape.N, shape.K, blocksize,
                        packed.size(1)};
    if (isa == Isa::kRows) rows_compute(args, ys);
    else permute_compute(args, ys);
  } else {
    const MatmulPlan p{packed.data_ptr<uint8_t>(), absmax_source(absmax, absmax2, offset), cb,
                       &q4_dynamic(), shape.N, shape.K, blocksize, log2b, blocksize / 2,
                       shape.K / 2};
    compute(p, isa, xf.data_ptr<float>(), shape.M, ys);
  }
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
