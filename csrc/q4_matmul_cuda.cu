// q4_matmul_cuda.cu: torch.ops.q4lab.matmul_4bit on CUDA (schema in q4_matmul_cpu.cpp).
//
// The specification is q4lab/reference/matmul.py (docs/format.md, "Fused matmul"): its 32 lanes
// (lane = flat index mod 32) are the 32 threads of a warp. One warp computes one output y[m, o]:
// lane l walks the row's elements e with e mod 32 == l in increasing order, summing per segment
// (q4_mm_add of q4_mm_product) and scaling once per segment (q4_mm_scale_add with the block's
// absmax, decoded from its nested code where double-quantized); the lane tree of widths
// 16, 8, 4, 2, 1 is __shfl_down_sync, which hands lane l the value of lane l + w, so lane 0 ends
// with exactly the reference's acc[0]. Built with --fmad=false --ftz=false: every * and + is one
// IEEE float32 rounding, as on the CPU. Source of the idea: bitsandbytes' kgemm_4bit_inference_naive
// (one warp per output row, packed weight read once), here with a fixed summation order.
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
__global__ void matmul_kernel(const typename D::T* x, const uint8_t* packed, Q4AbsmaxSource src,
                              Q4Codebook cb, Q4Dynamic dyn, int64_t M, int64_t N, int64_t K,
                              int64_t B, const float* bias, typename D::T* out) {
  const uint32_t lane = threadIdx.x & 31u;
  const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < M * N; w += warps) {
    const int64_t m = w / N, o = w % N;
    const typename D::T* xm = x + m * K;
    const int64_t begin = o * K, end = begin + K;
    float acc = 0.0f;
    for (int64_t e0 = begin; e0 < end;) {  // segments of the row, in order
      const int64_t b = e0 / B, seg_end = min(end, (b + 1) * B);
      int64_t e = e0 - q4_mm_lane(e0) + lane;  // this lane's first element at or after e0
      if (e < e0) e += 32;
      float s = 0.0f;
      for (; e < seg_end; e += 32)
        s = q4_mm_add(s, q4_mm_product(cb, q4_code_at(packed, e), D::load(xm[e - begin])));
      acc = q4_mm_scale_add(acc, q4_block_absmax(src, dyn, b), s);
      e0 = seg_end;
    }
    for (int width = 16; width >= 1; width >>= 1)
      acc = q4_mm_add(acc, __shfl_down_sync(0xffffffffu, acc, width));
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
  if (shape.M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Q4AbsmaxSource src = absmax_source(absmax, absmax2, offset);
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  const Q4Dynamic& dyn = q4_dynamic();
  // fp16/bf16 -> float32 is exact; bias_f32 lives until the launch below is queued.
  const at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat) : at::Tensor();
  const float* b = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  const int64_t warps = shape.M * shape.N;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(ceil_div(warps * 32, kMatmulThreads),
                                                              1 << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      matmul_kernel<Q4F32><<<grid, kMatmulThreads, 0, stream>>>(
          x.data_ptr<float>(), p, src, cb, dyn, shape.M, shape.N, shape.K, blocksize, b,
          out.data_ptr<float>());
      break;
    case at::kHalf:
      matmul_kernel<Q4F16><<<grid, kMatmulThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(x.data_ptr()), p, src, cb, dyn, shape.M, shape.N,
          shape.K, blocksize, b, reinterpret_cast<uint16_t*>(out.data_ptr()));
      break;
    default:
      matmul_kernel<Q4BF16><<<grid, kMatmulThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(x.data_ptr()), p, src, cb, dyn, shape.M, shape.N,
          shape.K, blocksize, b, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(q4lab, CUDA, m) { Q4MatmulOps<&matmul_4bit_out_cuda>::register_impls(m); }

}  // namespace q4lab
