// q4_dtype.h: the element types of the ops' inputs and outputs (float32, float16, bfloat16), one
// dispatch from a tensor's dtype to them, and (host only) one parallel-for; written ONCE for the
// C++ and CUDA kernels (docs/architecture.md §2).
//
// Q4F32 / Q4F16 / Q4BF16: `T` is the stored type (fp16 and bf16 as their 16 bits); `load` widens to
// float32 exactly, `store` rounds float32 to nearest even (q4_element.h's q4_f16_to_f32,
// q4_bf16_to_f32, q4_f32_to_f16, q4_f32_to_bf16: the reference's numpy float16 and
// reference/api.py round_to_bfloat16). `__host__ __device__` under nvcc.
// q4_dispatch_dtype(dtype, fn): calls fn(Q4F32{}), fn(Q4F16{}) or fn(Q4BF16{}); any other dtype is
// an error (the op's checks have refused it before). In the style of AT_DISPATCH_FLOATING_TYPES,
// without its macros: a generic lambda receives the type as a value.
// q4_parallel_chunks(n, chunk, fn): fn(first, last) over [0, n) in chunks of `chunk` items handed
// out dynamically to at::parallel_for's threads; every item is done by one call, so results do not
// depend on the thread count.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#if !defined(__CUDACC__)
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#endif
#include "q4_element.h"

struct Q4F32 {
  using T = float;
  Q4_HOST_DEVICE static float load(T v) { return v; }
  Q4_HOST_DEVICE static T store(float v) { return v; }
};
struct Q4F16 {
  using T = uint16_t;
  Q4_HOST_DEVICE static float load(T v) { return q4_f16_to_f32(v); }
  Q4_HOST_DEVICE static T store(float v) { return q4_f32_to_f16(v); }
};
struct Q4BF16 {
  using T = uint16_t;
  Q4_HOST_DEVICE static float load(T v) { return q4_bf16_to_f32(v); }
  Q4_HOST_DEVICE static T store(float v) { return q4_f32_to_bf16(v); }
};

template <class F>
inline void q4_dispatch_dtype(c10::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case c10::ScalarType::Float: fn(Q4F32{}); break;
    case c10::ScalarType::Half: fn(Q4F16{}); break;
    case c10::ScalarType::BFloat16: fn(Q4BF16{}); break;
    default: TORCH_CHECK(false, "q4lab: dtype ", dtype, " is not float32, float16 or bfloat16");
  }
}

#if !defined(__CUDACC__)
// A thread that is descheduled on a busy machine does not hold up a fixed share of the work
// (at::parallel_for alone splits the range statically, one piece per thread).
template <class F>
void q4_parallel_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), nchunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1))
      fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}
#endif
