// q4_checks.h: argument checks and output allocation shared by the CPU and CUDA ops (host only).
//
// The op schemas live in q4_cpu.cpp (TORCH_LIBRARY, in the style of pytorch/extension-cpp); the
// Python front end (q4lab/ops.py) checks user arguments first, so these checks guard direct calls of
// torch.ops.q4lab.* and say which argument is wrong. Layout: bitsandbytes functional.py::
// quantize_4bit (packed uint8 [ceil(n/2)], float32 absmax per block, nested blocks of 256).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>
#include "q4_element.h"

namespace q4lab {

constexpr int64_t kNestedBlocksize = 256;

inline Q4QuantType parse_quant_type(c10::string_view quant_type) {
  if (quant_type == "nf4") return Q4_NF4;
  if (quant_type == "fp4") return Q4_FP4;
  if (quant_type == "int4") return Q4_INT4;
  TORCH_CHECK(false, "q4lab: quant_type='", std::string(quant_type),
              "' is unknown; use 'nf4', 'fp4' or 'int4'");
}

inline void check_blocksize(int64_t blocksize) {
  bool ok = blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
  TORCH_CHECK(ok, "q4lab: blocksize=", blocksize, " is not one of 32, 64, ..., 4096");
}

Q4_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_1d(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "q4lab: ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "q4lab: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), "q4lab: ", name, " is on ", b.device(),
              " but the data is on ", a.device());
}

inline void check_scalar_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "q4lab: ", name,
              " must be a float32 tensor with one element, got ", t.scalar_type(), " of shape ",
              t.sizes());
}

inline void check_out(const at::Tensor& out, const char* name, int64_t numel, at::ScalarType dtype,
                      const at::Tensor& like) {
  TORCH_CHECK(out.numel() == numel && out.is_contiguous() && out.scalar_type() == dtype,
              "q4lab: output ", name, " must be a contiguous ", dtype, " tensor of ", numel,
              " elements, got ", out.scalar_type(), " of shape ", out.sizes());
  check_same_device(like, out, name);
}

// quantize_4bit: flat is a contiguous 1-D float32/float16/bfloat16 tensor.
inline int64_t check_quantize_args(const at::Tensor& flat, int64_t blocksize) {
  check_blocksize(blocksize);
  auto dt = flat.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "q4lab: input dtype ", dt, " is not supported; use float32, float16 or bfloat16");
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous(),
              "q4lab: input must be a contiguous 1-D tensor, got shape ", flat.sizes());
  TORCH_CHECK(flat.numel() > 0, "q4lab: cannot quantize an empty tensor");
  return ceil_div(flat.numel(), blocksize);
}

inline void check_absmax_count(int64_t count) {
  TORCH_CHECK(count > 0, "q4lab: absmax is empty");
  TORCH_CHECK(count < (int64_t(1) << 32), "q4lab: ", count,
              " absmax values exceed the 2^32 blocks the exact mean supports");
}

inline void check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, int64_t n) {
  check_blocksize(blocksize);
  check_1d(packed, "packed", at::kByte);
  check_1d(absmax, "absmax", at::kFloat);
  check_same_device(packed, absmax, "absmax");
  TORCH_CHECK(n > 0, "q4lab: n=", n, " must be positive");
  TORCH_CHECK(packed.numel() == ceil_div(n, 2), "q4lab: packed has ", packed.numel(),
              " bytes but n=", n, " needs ", ceil_div(n, 2));
  TORCH_CHECK(absmax.numel() == ceil_div(n, blocksize), "q4lab: absmax has ", absmax.numel(),
              " values but n=", n, " at blocksize ", blocksize, " needs ", ceil_div(n, blocksize));
}

inline void check_dequantize_absmax_args(const at::Tensor& codes, const at::Tensor& absmax2,
                                         const at::Tensor& offset) {
  check_1d(codes, "codes", at::kByte);
  check_1d(absmax2, "absmax2", at::kFloat);
  check_scalar_f32(offset, "offset");
  check_same_device(codes, absmax2, "absmax2");
  check_same_device(codes, offset, "offset");
  TORCH_CHECK(absmax2.numel() == ceil_div(codes.numel(), kNestedBlocksize), "q4lab: absmax2 has ",
              absmax2.numel(), " values but ", codes.numel(), " codes need ",
              ceil_div(codes.numel(), kNestedBlocksize));
}

inline at::ScalarType check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "q4lab: output dtype ", dtype, " is not supported; use float32, float16 or bfloat16");
  return dtype;
}

}  // namespace q4lab
