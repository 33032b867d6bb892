// q4_matmul_rows.h: the `rows` form of the CPU matmul_4bit (csrc/q4_matmul_rows.cpp), declared for
// the dispatcher in csrc/q4_matmul_cpu.cpp. The decode layout it reads is described there and in
// docs/format.md ("Decode layout"); q4lab.matmul.repack_rows builds it.
#pragma once
#include <cstdint>

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

}  // namespace q4lab
