// q4_formats_cuda.cu: CUDA implementation of torch.ops.q4lab.formats_quantize / formats_dequantize
// (schemas in q4_formats_cpu.cpp): MXFP4, NVFP4, GGUF Q4_0 / Q4_1, and dequantization of Q4_K /
// IQ4_NL. The arithmetic is q4_formats.h's, shared with the CPU, so the bytes equal
// q4lab/reference/mx.py and gguf_quants.py (which match torchao and the gguf package). Built with
// --fmad=false --ftz=false --prec-div=true, no --use_fast_math. One thread per block (blocks are
// 16 to 256 values and independent); grid-stride loops with 64-bit indices.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <string>
#include "q4_formats.h"

namespace q4lab {
namespace {

constexpr int kThreads = 128;
enum FormatId { kMxfp4 = 0, kNvfp4 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ4K = 4, kIq4Nl = 5 };

struct FormatSpec { FormatId id; int block; int block_bytes; bool mx; bool quantizable; };

FormatSpec spec_of(const std::string& qt) {
  if (qt == "mxfp4") return {kMxfp4, 32, 0, true, true};
  if (qt == "nvfp4") return {kNvfp4, 16, 0, true, true};
  if (qt == "q4_0") return {kQ4_0, 32, 18, false, true};
  if (qt == "q4_1") return {kQ4_1, 32, 20, false, true};
  if (qt == "q4_k") return {kQ4K, 256, 144, false, false};
  if (qt == "iq4_nl") return {kIq4Nl, 32, 18, false, false};
  TORCH_CHECK(false, "formats op: unknown quant_type '", qt, "'");
}

int64_t grid_for(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535));
}

__global__ void quantize_kernel(const float* x, uint8_t* packed, uint8_t* scales,
                                int64_t nblocks, int id, bool has_g, float g) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks;
       b += (int64_t)gridDim.x * blockDim.x) {
    uint8_t codes[32];
    if (id == kQ4_0) { q4f_q4_0_block(x + b * 32, packed + b * 18); continue; }
    if (id == kQ4_1) { q4f_q4_1_block(x + b * 32, packed + b * 20); continue; }
    const int block = id == kMxfp4 ? 32 : 16;
    const float* xb = x + b * block;
    scales[b] = id == kMxfp4 ? q4f_mxfp4_block(xb, 32, codes)
                             : q4f_nvfp4_block(xb, 16, has_g, g, codes);
    for (int j = 0; j < block / 2; ++j)
      packed[b * block / 2 + j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
  }
}

__global__ void dequantize_kernel(const uint8_t* packed, const uint8_t* scales, float* out,
                                  int64_t nblocks, int id, bool has_g, float g) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nblocks;
       b += (int64_t)gridDim.x * blockDim.x) {
    if (id == kQ4_0) { q4f_q4_0_dequant_block(packed + b * 18, out + b * 32); continue; }
    if (id == kQ4_1) { q4f_q4_1_dequant_block(packed + b * 20, out + b * 32); continue; }
    if (id == kIq4Nl) { q4f_iq4_nl_dequant_block(packed + b * 18, out + b * 32); continue; }
    if (id == kQ4K) { q4f_q4_k_dequant_block(packed + b * 144, out + b * 256); continue; }
    const int block = id == kMxfp4 ? 32 : 16;
    float scale = id == kMxfp4 ? q4f_e8m0_value(scales[b])
                  : (has_g ? g * q4f_e4m3_value(scales[b]) : q4f_e4m3_value(scales[b]));
    for (int i = 0; i < block; ++i) {
      uint8_t byte = packed[b * block / 2 + i / 2];
      uint8_t code = (i & 1) ? (uint8_t)(byte >> 4) : (uint8_t)(byte & 0xfu);
      out[b * block + i] = q4f_e2m1_value(code) * scale;
    }
  }
}

float scale_value(const c10::optional<at::Tensor>& g) {
  TORCH_CHECK(g->numel() == 1 && g->scalar_type() == at::kFloat,
              "tensor_scale must be one float32 value");
  return g->cpu().item<float>();
}

std::tuple<at::Tensor, at::Tensor> formats_quantize_cuda(const at::Tensor& flat,
                                                         const std::string& quant_type,
                                                         const c10::optional<at::Tensor>& g) {
  const FormatSpec f = spec_of(quant_type);
  TORCH_CHECK(f.quantizable, "no quantizer for ", quant_type);
  TORCH_CHECK(flat.scalar_type() == at::kFloat && flat.is_contiguous() && flat.dim() == 1,
              "formats_quantize takes a contiguous 1-d float32 tensor");
  const int64_t n = flat.numel();
  TORCH_CHECK(n % f.block == 0, "numel ", n, " is not a multiple of the block ", f.block);
  TORCH_CHECK(!g.has_value() || f.id == kNvfp4, "only nvfp4 has a tensor scale");
  const c10::cuda::CUDAGuard guard(flat.device());
  const int64_t nblocks = n / f.block;
  auto u8 = flat.options().dtype(at::kByte);
  at::Tensor packed = at::empty({f.mx ? n / 2 : nblocks * f.block_bytes}, u8);
  at::Tensor scales = at::empty({f.mx ? nblocks : 0}, u8);
  const bool has_g = g.has_value();
  const float gv = has_g ? scale_value(g) : 1.0f;
  auto stream = c10::cuda::getCurrentCUDAStream();
  quantize_kernel<<<grid_for(nblocks), kThreads, 0, stream>>>(
      flat.data_ptr<float>(), packed.data_ptr<uint8_t>(),
      f.mx ? scales.data_ptr<uint8_t>() : nullptr, nblocks, f.id, has_g, gv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scales};
}

at::Tensor formats_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales,
                                   const std::string& quant_type,
                                   const c10::optional<at::Tensor>& g, int64_t n) {
  const FormatSpec f = spec_of(quant_type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  TORCH_CHECK(n > 0 && n % f.block == 0, "n = ", n, " is not a positive multiple of ", f.block);
  const int64_t nblocks = n / f.block;
  TORCH_CHECK(packed.numel() == (f.mx ? n / 2 : nblocks * f.block_bytes),
              "packed has the wrong size for ", quant_type, " of ", n, " values");
  TORCH_CHECK(!f.mx || (scales.scalar_type() == at::kByte && scales.numel() == nblocks &&
                        scales.is_contiguous()), "scales must be ", nblocks, " uint8");
  TORCH_CHECK(!g.has_value() || f.id == kNvfp4, "only nvfp4 has a tensor scale");
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kFloat));
  const bool has_g = g.has_value();
  const float gv = has_g ? scale_value(g) : 1.0f;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dequantize_kernel<<<grid_for(nblocks), kThreads, 0, stream>>>(
      packed.data_ptr<uint8_t>(), f.mx ? scales.data_ptr<uint8_t>() : nullptr,
      out.data_ptr<float>(), nblocks, f.id, has_g, gv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(q4lab, CUDA, m) {
  m.impl("formats_quantize", &formats_quantize_cuda);
  m.impl("formats_dequantize", &formats_dequantize_cuda);
}

}  // namespace q4lab
