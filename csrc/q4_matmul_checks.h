// q4_matmul_checks.h: argument checks of torch.ops.q4lab.matmul_4bit and its allocating wrapper,
// shared by the CPU and CUDA implementations (host only); each backend writes only the `_out` form.
// The Python front end (q4lab/matmul.py) checks user arguments first and says what to do; these
// checks guard direct calls of the op and name the argument that is wrong.
#pragma once
#include "q4_checks.h"
#include "q4_matmul.h"
#include <vector>

namespace q4lab {

// `rows`: packed is the decode layout (K/B, G, B/2, 32), G = ceil(N/32), with absmax decoded to
// float32 (K/B, 32G), made by q4lab.matmul.repack_rows for the CPU `rows` form
// (csrc/q4_matmul_rows.cpp); the stored bytes reordered. Only when K % B == 0.
struct MatmulShape { int64_t M, K, N, nblocks; bool rows; };

inline MatmulShape check_matmul_args(const at::Tensor& x, const at::Tensor& packed,
                                     const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& absmax2,
                                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t out_features, const c10::optional<at::Tensor>& bias) {
  check_blocksize(blocksize);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "q4lab: matmul_4bit input x has dtype ", dt, "; use float32, float16 or bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(),
              "q4lab: matmul_4bit input x must be a contiguous (..., K) tensor, got shape ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(out_features > 0, "q4lab: out_features=", out_features, " must be positive");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0, "q4lab: matmul_4bit input x has no columns (K=0)");
  const int64_t M = x.numel() / K;  // x is (M, K) in memory, whatever its leading dimensions
  const int64_t n = out_features * K, nblocks = ceil_div(n, blocksize);
  const bool rows = packed.dim() == 4;
  check_same_device(x, packed, "packed");
  check_same_device(x, absmax, "absmax");
  if (rows) {
    const int64_t G = ceil_div(out_features, 32);
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
                "q4lab: a decode-layout packed weight must be a contiguous uint8 tensor");
    TORCH_CHECK(K % blocksize == 0 && packed.size(0) == K / blocksize && packed.size(1) == G &&
                packed.size(2) == blocksize / 2 && packed.size(3) == 32,
                "q4lab: decode-layout packed has shape ", packed.sizes(), " but a (", out_features,
                ", ", K, ") weight at blocksize ", blocksize, " needs (", K / blocksize, ", ", G,
                ", ", blocksize / 2, ", 32) and K % blocksize == 0");
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                absmax.dim() == 2 && absmax.size(0) == K / blocksize && absmax.size(1) == 32 * G,
                "q4lab: with the decode layout absmax must be decoded float32 of shape (",
                K / blocksize, ", ", 32 * G, "), got ", absmax.scalar_type(), " ",
                absmax.sizes());
    TORCH_CHECK(!absmax2.has_value() && !offset.has_value(),
                "q4lab: with the decode layout absmax is already decoded: no absmax2 or offset");
  } else {
    check_1d(packed, "packed", at::kByte);
    TORCH_CHECK(packed.numel() == ceil_div(n, 2), "q4lab: packed has ", packed.numel(),
                " bytes but a (", out_features, ", ", K, ") weight needs ", ceil_div(n, 2),
                " (does x's last dimension match the weight's in_features?)");
  }
  if (!rows && absmax2.has_value()) {
    check_1d(absmax, "absmax (nested codes)", at::kByte);
    check_1d(*absmax2, "absmax2", at::kFloat);
    check_same_device(x, *absmax2, "absmax2");
    TORCH_CHECK(offset.has_value(), "q4lab: a nested absmax needs an offset");
    check_scalar_f32(*offset, "offset");
    check_same_device(x, *offset, "offset");
    TORCH_CHECK(absmax2->numel() == ceil_div(nblocks, kNestedBlocksize), "q4lab: absmax2 has ",
                absmax2->numel(), " values but ", nblocks, " blocks need ",
                ceil_div(nblocks, kNestedBlocksize));
  } else if (!rows) {
    check_1d(absmax, "absmax", at::kFloat);
    TORCH_CHECK(!offset.has_value(), "q4lab: offset given without absmax2 (a plain absmax has none)");
  }
  TORCH_CHECK(rows || absmax.numel() == nblocks, "q4lab: absmax has ", absmax.numel(),
              " values but a (", out_features, ", ", K, ") weight at blocksize ", blocksize, " has ",
              nblocks, " blocks");
  if (bias.has_value()) {
    // Any of the three float dtypes: the op widens it to float32 itself (exact), so a bias rounded
    // to the compute dtype by the caller reaches the kernel as that rounded value (torch.compile
    // cannot fold a caller's float32 -> bf16 -> float32 cast pair away, docs/format.md §15).
    TORCH_CHECK(bias->dim() == 1 && bias->is_contiguous() && is_q4_float(bias->scalar_type()),
                "q4lab: bias must be a contiguous 1-D float32, float16 or bfloat16 tensor, got ",
                bias->scalar_type(), " of shape ", bias->sizes());
    check_same_device(x, *bias, "bias");
    TORCH_CHECK(bias->numel() == out_features, "q4lab: bias has ", bias->numel(),
                " values but out_features=", out_features);
  }
  return {M, K, out_features, nblocks, rows};
}

// x's shape with its last dimension K replaced by N: the shape of the op's output.
inline std::vector<int64_t> matmul_out_sizes(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  return sizes;
}

inline void check_matmul_out(const at::Tensor& out, const at::Tensor& x, const MatmulShape& s) {
  TORCH_CHECK(out.sizes() == at::IntArrayRef(matmul_out_sizes(x, s.N)) && out.is_contiguous() &&
              out.scalar_type() == x.scalar_type(),
              "q4lab: output of matmul_4bit must be a contiguous ", x.scalar_type(), " tensor of x's "
              "shape with its last dimension ", s.N, ", got ", out.scalar_type(), " of shape ",
              out.sizes());
  check_same_device(x, out, "out");
}

inline Q4AbsmaxSource absmax_source(const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax2,
                                    const c10::optional<at::Tensor>& offset) {
  Q4AbsmaxSource src{nullptr, nullptr, nullptr, 0.0f, Q4_NESTED_BLOCKSIZE_LOG2};
  if (absmax2.has_value()) {
    src.codes = absmax.data_ptr<uint8_t>();
    src.absmax2 = absmax2->data_ptr<float>();
    src.offset = offset->to(at::kCPU).contiguous().data_ptr<float>()[0];
  } else {
    src.absmax = absmax.data_ptr<float>();
  }
  return src;
}

// The allocating op and the registration of both forms, from a backend's `_out` function (the
// matmul counterpart of q4_checks.h's Q4Ops).
template <auto MatmulOut>
struct Q4MatmulOps {
  static at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed,
                                const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax2,
                                const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                c10::string_view quant_type, int64_t out_features,
                                const c10::optional<at::Tensor>& bias, c10::string_view isa) {
    const MatmulShape shape = check_matmul_args(x, packed, absmax, absmax2, offset, blocksize,
                                                out_features, bias);
    at::Tensor out = at::empty(matmul_out_sizes(x, shape.N), x.options());
    MatmulOut(x, packed, absmax, absmax2, offset, blocksize, quant_type, out_features, bias, isa,
              out);
    return out;
  }

  static void register_impls(torch::Library& m) {
    m.impl("matmul_4bit", &Q4MatmulOps::matmul_4bit);
    m.impl("matmul_4bit_out", MatmulOut);
  }
};

}  // namespace q4lab
