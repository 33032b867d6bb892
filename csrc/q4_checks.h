// q4_checks.h: argument checks, output allocation and op registration shared by the CPU and CUDA
// ops (host only; docs/architecture.md §2).
//
// The op schemas live in q4_cpu.cpp (TORCH_LIBRARY, in the style of pytorch/extension-cpp); the
// Python front end (q4lab/ops.py) checks user arguments first, so these checks guard direct calls of
// torch.ops.q4lab.* and say which argument is wrong. Layout: bitsandbytes functional.py::
// quantize_4bit (packed uint8 [ceil(n/2)], float32 absmax per block, nested groups of
// Q4_NESTED_BLOCKSIZE blocks). Each backend writes only the `_out` form of an op; Q4Ops below
// allocates the outputs and calls it, once for CPU and CUDA alike.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>
#include <torch/library.h>
#include <string>
#include <tuple>
#include "q4_element.h"

namespace q4lab {

constexpr int64_t kNestedBlocksize = Q4_NESTED_BLOCKSIZE;

inline std::string q4_quant_type_list() {
  std::string s;
  for (int q = 0; q < Q4_NUM_QUANT_TYPES; ++q)
    s += std::string(q ? ", '" : "'") + Q4_QUANT_TYPE_NAMES[q] + "'";
  return s;
}

inline Q4QuantType parse_quant_type(c10::string_view quant_type) {
  for (int q = 0; q < Q4_NUM_QUANT_TYPES; ++q)
    if (quant_type == Q4_QUANT_TYPE_NAMES[q]) return static_cast<Q4QuantType>(q);
  TORCH_CHECK(false, "q4lab: quant_type='", std::string(quant_type), "' is unknown; use one of ",
              q4_quant_type_list());
}

inline void check_blocksize(int64_t blocksize) {
  bool ok = false;
  for (int i = 0; i < Q4_NUM_BLOCKSIZES; ++i) ok = ok || blocksize == Q4_BLOCKSIZES[i];
  TORCH_CHECK(ok, "q4lab: blocksize=", blocksize, " is not one of ", Q4_MIN_BLOCKSIZE, ", ",
              2 * Q4_MIN_BLOCKSIZE, ", ..., ", Q4_MAX_BLOCKSIZE);
}

// The input/output dtypes of every op: float32, float16, bfloat16.
inline bool is_q4_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
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
  TORCH_CHECK(is_q4_float(dt),
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
  TORCH_CHECK(is_q4_float(dtype),
              "q4lab: output dtype ", dtype, " is not supported; use float32, float16 or bfloat16");
  return dtype;
}

// ---- the checks of each `_out` op, shared by the CPU and CUDA forms ----------------------------
// quantize_4bit_out: returns the number of blocks.
inline int64_t check_quantize_out(const at::Tensor& flat, int64_t blocksize,
                                  const at::Tensor& packed, const at::Tensor& absmax) {
  const int64_t nblocks = check_quantize_args(flat, blocksize);
  check_out(packed, "packed", ceil_div(flat.numel(), 2), at::kByte, flat);
  check_out(absmax, "absmax", nblocks, at::kFloat, flat);
  return nblocks;
}

// quantize_absmax_out: returns the number of absmax values; checks a given offset too.
inline int64_t check_quantize_absmax_out(const at::Tensor& absmax,
                                         const c10::optional<at::Tensor>& offset,
                                         const at::Tensor& codes, const at::Tensor& absmax2,
                                         const at::Tensor& offset_out) {
  check_1d(absmax, "absmax", at::kFloat);
  const int64_t count = absmax.numel();
  check_absmax_count(count);
  check_out(codes, "codes", count, at::kByte, absmax);
  check_out(absmax2, "absmax2", ceil_div(count, kNestedBlocksize), at::kFloat, absmax);
  check_out(offset_out, "offset", 1, at::kFloat, absmax);
  if (offset.has_value()) {
    check_scalar_f32(*offset, "offset");
    check_same_device(absmax, *offset, "offset");
  }
  return count;
}

inline void check_dequantize_absmax_out(const at::Tensor& codes, const at::Tensor& absmax2,
                                        const at::Tensor& offset, const at::Tensor& out) {
  check_dequantize_absmax_args(codes, absmax2, offset);
  check_out(out, "out", codes.numel(), at::kFloat, codes);
}

// dequantize_4bit_out: returns the codebook of quant_type.
inline Q4Codebook check_dequantize_out(const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, c10::string_view quant_type, int64_t n,
                                       const at::Tensor& out) {
  check_dequantize_args(packed, absmax, blocksize, n);
  const Q4Codebook cb = q4_make_codebook(parse_quant_type(quant_type));
  check_out(out, "out", n, check_out_dtype(out.scalar_type()), packed);
  return cb;
}

// ---- allocate-then-call-_out, written once -------------------------------------------------------
// Each backend writes the four `_out` ops; Q4Ops<its four _out functions, its allocator> gives the
// allocating ops and registers all eight (the CPU allocator adds a huge-page hint for large outputs).
inline at::Tensor q4_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

template <auto QuantizeOut, auto QuantizeAbsmaxOut, auto DequantizeAbsmaxOut, auto DequantizeOut,
          auto Empty = q4_empty>
struct Q4Ops {
  static std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& flat, int64_t blocksize,
                                                          c10::string_view quant_type) {
    const int64_t nblocks = check_quantize_args(flat, blocksize);
    at::Tensor packed = Empty({ceil_div(flat.numel(), 2)}, flat.options().dtype(at::kByte));
    at::Tensor absmax = Empty({nblocks}, flat.options().dtype(at::kFloat));
    QuantizeOut(flat, blocksize, quant_type, packed, absmax);
    return {packed, absmax};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax(
      const at::Tensor& absmax, const c10::optional<at::Tensor>& offset) {
    check_1d(absmax, "absmax", at::kFloat);
    check_absmax_count(absmax.numel());
    at::Tensor codes = Empty({absmax.numel()}, absmax.options().dtype(at::kByte));
    at::Tensor absmax2 = Empty({ceil_div(absmax.numel(), kNestedBlocksize)}, absmax.options());
    at::Tensor off = Empty({}, absmax.options());
    QuantizeAbsmaxOut(absmax, offset, codes, absmax2, off);
    return {codes, absmax2, off};
  }

  static at::Tensor dequantize_absmax(const at::Tensor& codes, const at::Tensor& absmax2,
                                      const at::Tensor& offset) {
    check_dequantize_absmax_args(codes, absmax2, offset);
    at::Tensor out = Empty({codes.numel()}, absmax2.options());
    DequantizeAbsmaxOut(codes, absmax2, offset, out);
    return out;
  }

  static at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                                    int64_t blocksize, c10::string_view quant_type, int64_t n,
                                    at::ScalarType dtype) {
    check_dequantize_args(packed, absmax, blocksize, n);
    at::Tensor out = Empty({n}, packed.options().dtype(check_out_dtype(dtype)));
    DequantizeOut(packed, absmax, blocksize, quant_type, n, out);
    return out;
  }

  static void register_impls(torch::Library& m) {
    m.impl("quantize_4bit", &Q4Ops::quantize_4bit);
    m.impl("quantize_4bit_out", QuantizeOut);
    m.impl("quantize_absmax", &Q4Ops::quantize_absmax);
    m.impl("quantize_absmax_out", QuantizeAbsmaxOut);
    m.impl("dequantize_absmax", &Q4Ops::dequantize_absmax);
    m.impl("dequantize_absmax_out", DequantizeAbsmaxOut);
    m.impl("dequantize_4bit", &Q4Ops::dequantize_4bit);
    m.impl("dequantize_4bit_out", DequantizeOut);
  }
};

}  // namespace q4lab
