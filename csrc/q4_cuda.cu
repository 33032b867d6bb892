// q4_cuda.cu: CUDA implementation of the torch.ops.q4lab.* ops (schemas in q4_cpu.cpp).
//
// The arithmetic is q4_element.h's, shared with the CPU (docs/format.md §1-§8), so the bytes equal
// q4lab/reference's; the layout is bitsandbytes' (kernels.cu::kQuantizeBlockwise: high nibble
// first, one float32 absmax per block). Differences from bnb's kernels on purpose: built with
// --fmad=false --ftz=false --prec-div=true and no --use_fast_math (bnb uses fast-math), absmax is a
// NaN-propagating max over |x| bits, and the double-quant offset is the exact mean (integer
// exponent bins, q4_mean_from_bins) instead of torch's float32 mean.
// Launches: grid-stride loops with 64-bit indices; quantize uses one warp per block of `blocksize`
// elements (absmax by warp shuffle), double quant one warp per group of Q4_NESTED_BLOCKSIZE blocks.
// Each op is written once, as its `_out` form; q4_checks.h's Q4Ops (CudaOps) allocates and registers.
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "q4_checks.h"
#include "q4_dtype.h"

namespace q4lab {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int64_t grid_for(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work_items, kThreads), 65535));
}

__device__ inline uint32_t warp_max_bits(uint32_t m) {
  for (int off = kWarp / 2; off > 0; off >>= 1) m = q4_max_bits(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

__device__ inline int64_t global_warp() { return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; }
__device__ inline int64_t warp_count() { return ((int64_t)gridDim.x * blockDim.x) / kWarp; }

// The dynamic map into shared memory, by the whole thread block.
__device__ inline void load_shared(Q4Dynamic& dst, const Q4Dynamic& src) {
  for (int k = threadIdx.x; k < Q4_DYNAMIC_CODES; k += blockDim.x) {
    dst.midpoint[k] = src.midpoint[k];
    dst.value[k] = src.value[k];
  }
  __syncthreads();
}

// Steps 2-6 (reference/blockwise.py): one warp per block; an odd n pads with the zero code.
template <class D>
__global__ void quantize_kernel(const typename D::T* x, int64_t n, int64_t blocksize, Q4Codebook cb,
                                uint8_t* packed, float* absmax) {
  __shared__ Q4Codebook scb;
  if (threadIdx.x == 0) scb = cb;
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t nblocks = ceil_div(n, blocksize);
  for (int64_t b = global_warp(); b < nblocks; b += warp_count()) {
    const int64_t lo = b * blocksize, hi = min(n, lo + blocksize);
    uint32_t m = 0;
    for (int64_t i = lo + lane; i < hi; i += kWarp) m = q4_max_bits(m, q4_abs_bits(D::load(x[i])));
    const float a = q4_float(warp_max_bits(m));
    if (lane == 0) absmax[b] = a;
    const Q4Scale s = q4_reciprocal_scale(a);
    for (int64_t j = lo / 2 + lane; j < (hi + 1) / 2; j += kWarp) {
      const float x0 = D::load(x[2 * j]);
      uint32_t odd = scb.zero_code;
      if (2 * j + 1 < hi) {
        const float x1 = D::load(x[2 * j + 1]);
        odd = q4_encode(scb, q4_scale(x1, s), x1);
      }
      packed[j] = q4_pack(q4_encode(scb, q4_scale(x0, s), x0), odd);
    }
  }
}

// Exact mean, part 1 (reference/double_quant.py::exponent_bins): integer sums per exponent.
__global__ void exponent_bins_kernel(const float* absmax, int64_t count, unsigned long long* bins) {
  __shared__ unsigned long long local[Q4_EXPONENT_BINS];
  for (int e = threadIdx.x; e < Q4_EXPONENT_BINS; e += blockDim.x) local[e] = 0;
  __syncthreads();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    atomicAdd(&local[q4_bin_of(absmax[i])], (unsigned long long)q4_bin_mantissa(absmax[i]));
  __syncthreads();
  for (int e = threadIdx.x; e < Q4_EXPONENT_BINS; e += blockDim.x)
    if (local[e]) atomicAdd(&bins[e], local[e]);
}

// Part 2: rounded once. Non-finite absmax (the last bin) gives a NaN offset (the CPU op raises).
__global__ void mean_kernel(const unsigned long long* bins, int64_t count, float* offset) {
  uint64_t b[Q4_EXPONENT_BINS];
  for (int e = 0; e < Q4_EXPONENT_BINS; ++e) b[e] = bins[e];
  *offset = b[Q4_EXPONENT_BINS - 1] ? q4_float(0x7fc00000u) : q4_mean_from_bins(b, (uint64_t)count);
}

// Center, absmax per 256, scale, 8-bit code (reference/double_quant.py::quantize_absmax).
__global__ void quantize_absmax_kernel(const float* absmax, int64_t count, const float* offset,
                                       Q4Dynamic dyn, uint8_t* codes, float* absmax2) {
  __shared__ Q4Dynamic sdyn;
  load_shared(sdyn, dyn);
  const int lane = threadIdx.x % kWarp;
  const float off = *offset;
  const int64_t ngroups = ceil_div(count, kNestedBlocksize);
  for (int64_t g = global_warp(); g < ngroups; g += warp_count()) {
    const int64_t lo = g * kNestedBlocksize, hi = min(count, lo + kNestedBlocksize);
    uint32_t m = 0;
    for (int64_t i = lo + lane; i < hi; i += kWarp) m = q4_max_bits(m, q4_abs_bits(absmax[i] - off));
    const float a2 = q4_float(warp_max_bits(m));
    if (lane == 0) absmax2[g] = a2;
    const Q4Scale s = q4_reciprocal_scale(a2);
    for (int64_t i = lo + lane; i < hi; i += kWarp)
      codes[i] = q4_encode_absmax_code(sdyn, q4_scale(absmax[i] - off, s), a2, off);
  }
}

__global__ void dequantize_absmax_kernel(const uint8_t* codes, int64_t count, const float* absmax2,
                                         const float* offset, Q4Dynamic dyn, float* out) {
  __shared__ Q4Dynamic sdyn;
  load_shared(sdyn, dyn);
  const float off = *offset;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    out[i] = q4_decode_absmax(sdyn, codes[i], absmax2[i / kNestedBlocksize], off);
}

// One thread per packed byte -> two outputs (the second only when 2j + 1 < n).
template <class D>
__global__ void dequantize_kernel(const uint8_t* packed, const float* absmax, int64_t blocksize,
                                  int64_t n, Q4Codebook cb, typename D::T* out) {
  __shared__ Q4Codebook scb;
  if (threadIdx.x == 0) scb = cb;
  __syncthreads();
  const int64_t nbytes = ceil_div(n, 2);
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < nbytes;
       j += (int64_t)gridDim.x * blockDim.x) {
    const uint32_t p = packed[j];
    const float a = absmax[2 * j / blocksize];  // 2j and 2j + 1 share a block: blocksize is even
    out[2 * j] = D::store(q4_decode(scb, p >> 4, a));
    if (2 * j + 1 < n) out[2 * j + 1] = D::store(q4_decode(scb, p & 15u, a));
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void quantize_4bit_out_cuda(const at::Tensor& flat, int64_t blocksize, c10::string_view quant_type,
                            at::Tensor& packed, at::Tensor& absmax) {
  const int64_t nblocks = check_quantize_out(flat, blocksize, packed, absmax);
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  c10::cuda::CUDAGuard guard(flat.device());
  const int64_t grid = grid_for(nblocks * kWarp), n = flat.numel();
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  q4_dispatch_dtype(flat.scalar_type(), [&](auto dtype) {
    using D = decltype(dtype);
    const auto* x = reinterpret_cast<const typename D::T*>(flat.data_ptr());
    quantize_kernel<D><<<grid, kThreads, 0, stream()>>>(x, n, blocksize, cb, p, a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quantize_absmax_out_cuda(const at::Tensor& absmax, const c10::optional<at::Tensor>& offset,
                              at::Tensor& codes, at::Tensor& absmax2, at::Tensor& offset_out) {
  const int64_t count = check_quantize_absmax_out(absmax, offset, codes, absmax2, offset_out);
  const int64_t ngroups = ceil_div(count, kNestedBlocksize);
  c10::cuda::CUDAGuard guard(absmax.device());
  const float* a = absmax.data_ptr<float>();
  float* off = offset_out.data_ptr<float>();
  if (offset.has_value()) {
    offset_out.copy_(offset->reshape(offset_out.sizes()));
  } else {
    at::Tensor bins = at::zeros({Q4_EXPONENT_BINS}, absmax.options().dtype(at::kLong));
    auto* b = reinterpret_cast<unsigned long long*>(bins.data_ptr<int64_t>());
    exponent_bins_kernel<<<grid_for(count), kThreads, 0, stream()>>>(a, count, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_kernel<<<1, 1, 0, stream()>>>(b, count, off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  quantize_absmax_kernel<<<grid_for(ngroups * kWarp), kThreads, 0, stream()>>>(
      a, count, off, q4_dynamic(), codes.data_ptr<uint8_t>(), absmax2.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_absmax_out_cuda(const at::Tensor& codes, const at::Tensor& absmax2,
                                const at::Tensor& offset, at::Tensor& out) {
  check_dequantize_absmax_out(codes, absmax2, offset, out);
  c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor off = offset.contiguous();
  dequantize_absmax_kernel<<<grid_for(codes.numel()), kThreads, 0, stream()>>>(
      codes.data_ptr<uint8_t>(), codes.numel(), absmax2.data_ptr<float>(), off.data_ptr<float>(),
      q4_dynamic(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_4bit_out_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              c10::string_view quant_type, int64_t n, at::Tensor& out) {
  const Q4Codebook cb = check_dequantize_out(packed, absmax, blocksize, quant_type, n, out);
  c10::cuda::CUDAGuard guard(packed.device());
  const int64_t grid = grid_for(ceil_div(n, 2));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  q4_dispatch_dtype(out.scalar_type(), [&](auto dtype) {
    using D = decltype(dtype);
    auto* o = reinterpret_cast<typename D::T*>(out.data_ptr());
    dequantize_kernel<D><<<grid, kThreads, 0, stream()>>>(p, a, blocksize, n, cb, o);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using CudaOps = Q4Ops<quantize_4bit_out_cuda, quantize_absmax_out_cuda, dequantize_absmax_out_cuda,
                     dequantize_4bit_out_cuda>;

}  // namespace

TORCH_LIBRARY_IMPL(q4lab, CUDA, m) { CudaOps::register_impls(m); }

}  // namespace q4lab
