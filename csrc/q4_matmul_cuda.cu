// q4_matmul_cuda.cu: torch.ops.q4lab.matmul_4bit on CUDA (schema in q4_matmul_cpu.cpp).
//
// The specification is q4lab/reference/matmul.py, summation order pair-chain-v2 (docs/format.md,
// "Fused matmul"). A thread block of 8 warps computes 8 output rows (several rows per block); the
// 16 codebook values sit in shared memory. In a warp, lane l computes the sums s of the row's
// segments l, l + 32, ... (one chain of byte-pair terms per block, as the spec says); when every row
// has the same blocks (K % B == 0) and the bytes are 16-byte aligned, a lane reads its block with
// 16-byte loads (uint4, 32 weights per load); otherwise q4_mm_segment_sum reads byte by byte.
// The row sum acc = RN(acc + RN(absmax * s)) then runs in segment order: each lane scales its s,
// and __shfl_sync hands the scaled sums, one segment after another, to every lane. Built with
// --fmad=false --ftz=false: every * and + is one IEEE float32 rounding, as on the CPU. Source of
// the idea: bitsandbytes' kgemm_4bit_inference_naive (packed weight read once, 16-byte loads,
// codebook in shared memory), here with a fixed summation order.
#include <torch/library.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "q4_dtype.h"
#include "q4_matmul_checks.h"

namespace q4lab {
namespace {

constexpr int kMatmulThreads = 256;

template <class D>
struct RowInputCuda {
  const typename D::T* x;
  __device__ float operator()(int64_t k) const { return D::load(x[k]); }
};

template <class D>
__global__ void matmul_kernel(const typename D::T* x, const uint8_t* packed, Q4AbsmaxSource src,
                              Q4Codebook cb, Q4Dynamic dyn, int64_t M, int64_t N, int64_t K,
                              int64_t B, bool wide, const float* bias, typename D::T* out) {
  __shared__ float value[Q4_CODES];
  if (threadIdx.x < Q4_CODES) value[threadIdx.x] = cb.value[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < M * N; w += warps) {
    const int64_t m = w / N, o = w % N;
    const typename D::T* xm = x + m * K;
    const int64_t begin = o * K, end = begin + K;
    const int64_t first_block = begin / B, nseg = (end - 1) / B - first_block + 1;
    float acc = 0.0f;
    for (int64_t base = 0; base < nseg; base += 32) {
      const int64_t t = base + lane, b = first_block + t;
      float scaled = 0.0f;
      if (t < nseg) {
        const int64_t start = t == 0 ? begin : b * B, stop = min(end, (b + 1) * B);
        float s = 0.0f;
        if (wide) {  // a whole block, 16-byte aligned: 32 weights per load
          const uint4* words = reinterpret_cast<const uint4*>(packed + (start >> 1));
          const int64_t k0 = start - begin;
          for (int64_t v = 0; v < (B >> 5); ++v) {
            const uint4 word = words[v];
            const uint32_t parts[4] = {word.x, word.y, word.z, word.w};
            for (int q = 0; q < 4; ++q)
              for (int i = 0; i < 4; ++i) {
                const uint32_t byte = (parts[q] >> (8 * i)) & 255u;
                const int64_t k = k0 + 32 * v + 8 * q + 2 * i;
                const float hi = q4_mm_product_of(value, byte >> 4, D::load(xm[k]));
                const float lo = q4_mm_product_of(value, byte & 15u, D::load(xm[k + 1]));
                s = q4_mm_add(s, q4_mm_add(hi, lo));
              }
          }
        } else {
          s = q4_mm_segment_sum(cb, packed, begin, start, stop, RowInputCuda<D>{xm});
        }
        scaled = q4_block_absmax(src, dyn, b) * s;  // RN(absmax * s), added in segment order below
      }
      const int64_t count = min((int64_t)32, nseg - base);
      for (int j = 0; j < count; ++j) acc = q4_mm_add(acc, __shfl_sync(0xffffffffu, scaled, j));
    }
    if (lane == 0) out[m * N + o] = D::store(bias ? q4_mm_add(acc, bias[o]) : acc);
  }
}

void matmul_4bit_out_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& absmax2,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize,
                          c10::string_view quant_type, int64_t out_features,
                          const c10::optional<at::Tensor>& bias, c10::string_view isa,
                          at::Tensor& out) {
  const MatmulShape shape = check_matmul_args(x, packed, absmax, absmax2, offset, blocksize,
                                              out_features, bias);
  check_matmul_out(out, x, shape);
  TORCH_CHECK(isa == "auto" || isa == "cuda", "q4lab: matmul_4bit on CUDA takes isa='auto'");
  TORCH_CHECK(!shape.rows, "q4lab: the decode layout (q4lab.matmul.repack_rows) is a CPU layout; pass "
              "the stored 1-D packed bytes on CUDA");
  if (shape.M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Q4AbsmaxSource src = absmax_source(absmax, absmax2, offset);
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  const Q4Dynamic& dyn = q4_dynamic();
  // fp16/bf16 -> float32 is exact; bias_f32 lives until the launch below is queued.
  const at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat) : at::Tensor();
  const float* b = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  const int64_t warps = shape.M * shape.N;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  // 16-byte loads need whole blocks in every row (K % B == 0) at 16-byte aligned addresses.
  const bool wide = shape.K % blocksize == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(ceil_div(warps * 32, kMatmulThreads),
                                                              1 << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (x.scalar_type()) {
    case at::kFloat:
      matmul_kernel<Q4F32><<<grid, kMatmulThreads, 0, stream>>>(
          x.data_ptr<float>(), p, src, cb, dyn, shape.M, shape.N, shape.K, blocksize, wide, b,
          out.data_ptr<float>());
      break;
    case at::kHalf:
      matmul_kernel<Q4F16><<<grid, kMatmulThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(x.data_ptr()), p, src, cb, dyn, shape.M, shape.N,
          shape.K, blocksize, wide, b, reinterpret_cast<uint16_t*>(out.data_ptr()));
      break;
    default:
      matmul_kernel<Q4BF16><<<grid, kMatmulThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(x.data_ptr()), p, src, cb, dyn, shape.M, shape.N,
          shape.K, blocksize, wide, b, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(q4lab, CUDA, m) { Q4MatmulOps<&matmul_4bit_out_cuda>::register_impls(m); }

}  // namespace q4lab
