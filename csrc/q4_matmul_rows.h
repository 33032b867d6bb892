// q4_matmul_rows.h: the two CPU forms of matmul_4bit that read the decode layout, `rows` (AVX2,
// csrc/q4_matmul_rows.cpp) and `permute` (AVX-512F, csrc/q4_matmul_permute.cpp), declared for the
// dispatcher in csrc/q4_matmul_cpu.cpp, and the driver they share (threads, buffers, row order).
// The decode layout is described in csrc/q4_matmul_rows.cpp and docs/format.md ("Decode layout");
// q4lab.matmul.repack_rows builds it.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "q4_dtype.h"

namespace q4lab {

struct RowsArgs {
  const uint8_t* packed;  // (K/B, G, B/2, 32)
  const float* absmax;    // (K/B, 32G), decoded
  const float* table;     // the 16 codebook values
  const float* x;         // (M, K) float32
  int64_t M, N, K, B, G;
};

// Position p (0..31) of a 32-byte code vector holds row 32g + rows_row_of_position(p).
int64_t rows_row_of_position(int64_t p);
// True where the form is compiled (the build's -march has AVX2).
bool rows_form_available();
// y (M, N) float32 = x . W^T without bias, pair-chain-v2.
void rows_compute(const RowsArgs& args, float* y);
// True where `permute` runs as AVX-512F code (elsewhere it is compiled from the same source by the
// compiler's generic vector lowering: right, slow, there for the tests).
bool permute_form_native();
void permute_compute(const RowsArgs& args, float* y);

// The driver of both forms. A Form provides
//   kTableBytes                    bytes of lookup tables per input element x[m][k];
//   build(table, x, K, T)          the tables of one input row;
//   block(codes, C, T, absmax, acc)  one block of one group of 32 rows: the chain of pair terms
//                                  over the block's C byte columns, then acc = RN(acc + RN(absmax*s));
//   store(acc, y, N)               the N row sums of one input row, from acc (32 per group).
// Blocks are outer (a block's tables, B * kTableBytes per input row, stay in L1 while the groups go
// by), groups inner. Every row's chain is the spec's chain whichever thread runs it.
template <class Form>
void groups_chunk(const RowsArgs& a, const uint8_t* T, int64_t g0, int64_t g1, float* acc) {
  const int64_t C = a.B / 2, nb = a.K / a.B, G32 = a.G * 32;
  const int64_t row_tables = a.K * Form::kTableBytes;
  for (int64_t m = 0; m < a.M; ++m)
    std::fill(acc + m * G32 + 32 * g0, acc + m * G32 + 32 * g1, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = a.packed + b * a.G * C * 32;
    const float* am = a.absmax + b * G32;
    const uint8_t* Tb = T + b * a.B * Form::kTableBytes;
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < a.M; ++m)
        Form::block(block + g * C * 32, C, Tb + m * row_tables, am + 32 * g,
                    acc + m * G32 + 32 * g);
  }
}

template <class Form>
void groups_compute(const RowsArgs& a, float* y) {
  // Layers below this many weights per thread run on fewer threads (a wake-up must pay off).
  constexpr int64_t kMinWeightsPerThread = 1 << 15;
  struct alignas(64) Line {
    uint8_t bytes[64];
  };
  const int64_t G32 = a.G * 32;
  // The tables of every input row, built once by the calling thread and read by all threads; the
  // row sums, one per padded row. Buffers reused across calls (no allocation per token).
  thread_local std::vector<Line> table_buffer;
  thread_local std::vector<float> acc_buffer;
  const size_t need = size_t((a.M * a.K * Form::kTableBytes + 63) / 64);
  if (table_buffer.size() < need) table_buffer.resize(need);
  if ((int64_t)acc_buffer.size() < a.M * G32) acc_buffer.resize(a.M * G32);
  uint8_t* T = table_buffer.data()->bytes;
  float* acc = acc_buffer.data();
  for (int64_t m = 0; m < a.M; ++m)
    Form::build(a.table, a.x + m * a.K, a.K, T + m * a.K * Form::kTableBytes);
  const int64_t weights = G32 * a.K * a.M;
  const int64_t threads = at::get_num_threads();
  if (weights < 2 * kMinWeightsPerThread || threads <= 1 || a.G < 4 ||
      at::in_parallel_region()) {
    groups_chunk<Form>(a, T, 0, a.G, acc);
  } else {
    // Two chunks of groups per thread, handed out one at a time (q4_parallel_chunks): a thread
    // descheduled on a busy machine holds up a quarter of the layer, not half of it.
    q4_parallel_chunks(a.G, std::max<int64_t>(2, (a.G + 2 * threads - 1) / (2 * threads)),
                       [&](int64_t g0, int64_t g1) { groups_chunk<Form>(a, T, g0, g1, acc); });
  }
  for (int64_t m = 0; m < a.M; ++m) Form::store(acc + m * G32, y + m * a.N, a.N);
}

}  // namespace q4lab
