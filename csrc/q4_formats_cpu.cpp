// q4_formats_cpu.cpp: torch.ops.q4lab.formats_quantize / formats_dequantize, the CPU kernels of
// MXFP4, NVFP4 (quantize + dequantize), GGUF Q4_0 / Q4_1 (quantize + dequantize), Q4_K / IQ4_NL
// (dequantize), registered as a TORCH_LIBRARY_FRAGMENT beside q4_cpu.cpp's ops. The arithmetic is
// q4_formats.h's (shared with q4_formats_cuda.cu); the bytes equal q4lab/reference/mx.py and
// gguf_quants.py (tests/test_formats_kernels.py, bench/sweep_formats.py --backend cpu), which match
// torchao and the gguf package. Input checks that need a message (NaN/Inf, rows, fp16 overflow)
// are made once in Python (q4lab/ops.py); these ops check shapes and dtypes with TORCH_CHECK.
//   formats_quantize(flat float32, quant_type, tensor_scale?) -> (packed uint8, scales uint8)
//     mxfp4 / nvfp4: packed = codes, element 2j in the LOW nibble; scales = E8M0 / E4M3 per block
//     q4_0 / q4_1:   packed = GGUF blocks (18 / 20 bytes per 32 values); scales empty
//   formats_dequantize(packed, scales, quant_type, tensor_scale?, n) -> float32 (n,)
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <string>
#include "q4_formats.h"

namespace q4lab {
namespace {

struct FormatInfo { int block; int block_bytes; bool mx; bool quantizable; };

FormatInfo format_info(const std::string& qt) {
  if (qt == "mxfp4") return {32, 0, true, true};
  if (qt == "nvfp4") return {16, 0, true, true};
  if (qt == "q4_0") return {32, 18, false, true};
  if (qt == "q4_1") return {32, 20, false, true};
  if (qt == "q4_k") return {256, 144, false, false};
  if (qt == "iq4_nl") return {32, 18, false, false};
  TORCH_CHECK(false, "formats op: unknown quant_type '", qt,
              "'; use mxfp4, nvfp4, q4_0, q4_1 (or q4_k, iq4_nl to dequantize)");
}

float tensor_scale_value(const c10::optional<at::Tensor>& g) {
  TORCH_CHECK(g->numel() == 1 && g->scalar_type() == at::kFloat,
              "tensor_scale must be one float32 value");
  return g->cpu().item<float>();
}

std::tuple<at::Tensor, at::Tensor> formats_quantize_cpu(const at::Tensor& flat,
                                                        const std::string& quant_type,
                                                        const c10::optional<at::Tensor>& g) {
  const FormatInfo f = format_info(quant_type);
  TORCH_CHECK(f.quantizable, "no quantizer for ", quant_type);
  TORCH_CHECK(flat.scalar_type() == at::kFloat && flat.is_contiguous() && flat.dim() == 1,
              "formats_quantize takes a contiguous 1-d float32 tensor");
  const int64_t n = flat.numel(), block = f.block;
  TORCH_CHECK(n % block == 0, "numel ", n, " is not a multiple of the block ", block);
  const int64_t nblocks = n / block;
  const bool has_g = g.has_value();
  TORCH_CHECK(!has_g || quant_type == "nvfp4", "only nvfp4 has a tensor scale");
  const float gv = has_g ? tensor_scale_value(g) : 1.0f;
  auto u8 = flat.options().dtype(at::kByte);
  at::Tensor packed = at::empty({f.mx ? n / 2 : nblocks * f.block_bytes}, u8);
  at::Tensor scales = at::empty({f.mx ? nblocks : 0}, u8);
  const float* x = flat.data_ptr<float>();
  uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* s = f.mx ? scales.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, nblocks, 256, [&](int64_t lo, int64_t hi) {
    uint8_t codes[32];
    for (int64_t b = lo; b < hi; ++b) {
      const float* xb = x + b * block;
      if (quant_type == "mxfp4") {
        s[b] = q4f_mxfp4_block(xb, 32, codes);
      } else if (quant_type == "nvfp4") {
        s[b] = q4f_nvfp4_block(xb, 16, has_g, gv, codes);
      } else if (quant_type == "q4_0") {
        q4f_q4_0_block(xb, p + b * 18);
        continue;
      } else {
        q4f_q4_1_block(xb, p + b * 20);
        continue;
      }
      uint8_t* pb = p + b * block / 2;
      for (int64_t j = 0; j < block / 2; ++j)
        pb[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
    }
  });
  return {packed, scales};
}

at::Tensor formats_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scales,
                                  const std::string& quant_type,
                                  const c10::optional<at::Tensor>& g, int64_t n) {
  const FormatInfo f = format_info(quant_type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  const int64_t block = f.block;
  TORCH_CHECK(n > 0 && n % block == 0, "n = ", n, " is not a positive multiple of ", block);
  const int64_t nblocks = n / block;
  TORCH_CHECK(packed.numel() == (f.mx ? n / 2 : nblocks * f.block_bytes),
              "packed has ", packed.numel(), " bytes, ", quant_type, " of ", n, " values needs ",
              f.mx ? n / 2 : nblocks * f.block_bytes);
  if (f.mx) {
    TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                scales.numel() == nblocks, "scales must be ", nblocks, " contiguous uint8");
  }
  const bool has_g = g.has_value();
  TORCH_CHECK(!has_g || quant_type == "nvfp4", "only nvfp4 has a tensor scale");
  const float gv = has_g ? tensor_scale_value(g) : 1.0f;
  at::Tensor out = at::empty({n}, packed.options().dtype(at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint8_t* s = f.mx ? scales.data_ptr<uint8_t>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, nblocks, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      float* ob = o + b * block;
      if (f.mx) {
        float scale = quant_type == "mxfp4" ? q4f_e8m0_value(s[b])
                      : (has_g ? gv * q4f_e4m3_value(s[b]) : q4f_e4m3_value(s[b]));
        const uint8_t* pb = p + b * block / 2;
        for (int64_t i = 0; i < block; ++i) {
          uint8_t code = (i & 1) ? (uint8_t)(pb[i / 2] >> 4) : (uint8_t)(pb[i / 2] & 0xfu);
          ob[i] = q4f_e2m1_value(code) * scale;
        }
      } else if (quant_type == "q4_0") {
        q4f_q4_0_dequant_block(p + b * 18, ob);
      } else if (quant_type == "q4_1") {
        q4f_q4_1_dequant_block(p + b * 20, ob);
      } else if (quant_type == "iq4_nl") {
        q4f_iq4_nl_dequant_block(p + b * 18, ob);
      } else {
        q4f_q4_k_dequant_block(p + b * 144, ob);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(q4lab, m) {
  m.def("formats_quantize(Tensor flat, str quant_type, Tensor? tensor_scale) -> (Tensor, Tensor)");
  m.def("formats_dequantize(Tensor packed, Tensor scales, str quant_type, Tensor? tensor_scale, "
        "int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(q4lab, CPU, m) {
  m.impl("formats_quantize", &formats_quantize_cpu);
  m.impl("formats_dequantize", &formats_dequantize_cpu);
}

}  // namespace q4lab
