"""torch.compile(Linear4bit) gives the eager bytes: every compute dtype, bias or none, 1, 8 and 16
rows, both matmul paths (the fused ``q4lab.matmul_4bit`` and dequantize + ``F.linear``).

The defect this guards (issue: bitsandbytes' own 4-bit tests): ``Linear4bit.forward`` rounds a
float32 bias to the compute dtype, and the fused path used to widen it back to float32 before the
op; inductor folds such a cast pair away (``torch._inductor.config.emulate_precision_casts=False``,
its default), so the compiled layer added the unrounded bias and 18 of 256 bf16 outputs moved by one
step. The op now takes the bias in its compute dtype and widens it itself (docs/format.md §15).

Compilation is slow on two cores, so every configuration lives in one module: each case's layer
three times (matmul_path "fused", "dequantize", "auto"), each called on 1, 8 and 16 rows, so one
graph without autograd and one with it cover all parametrizations. Compiled with the real inductor,
``fullgraph=True`` (a graph break would run pieces eagerly and hide a difference) and a failing
recompile limit (an eager fallback after too many recompiles would pass vacuously). Source:
bitsandbytes ``tests/test_linear4bit.py::test_linear4bit_torch_compile`` (compiled vs eager).
"""
import pytest
import torch
from torch import nn

import q4lab
from q4lab import Linear4bit, ops
from q4lab.testing import byte_mismatch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# name: (compute dtype, bias dtype or None, input dtype, quant type, double quant, in, out, block)
CASES = {
    "f32": (F32, None, F32, "nf4", True, 96, 72, 64),
    "f32+bias": (F32, F32, F32, "fp4", False, 130, 40, 32),
    "f16": (F16, None, F16, "fp4", True, 96, 72, 64),
    "f16+bias": (F16, F32, F16, "nf4", True, 96, 72, 64),
    "bf16": (BF16, None, BF16, "nf4", False, 64, 48, 128),
    "bf16+bias": (BF16, F32, BF16, "nf4", True, 96, 72, 64),
    "bf16+bias, f32 input": (BF16, F32, F32, "fp4", True, 130, 40, 64),
    "f16+bf16 bias, bf16 input": (F16, BF16, BF16, "nf4", False, 96, 72, 32),
}
PATHS = ("fused", "dequantize", "auto")
ROWS = {1: (1,), 8: (8,), 16: (2, 8)}  # 16 rows as a (batch, sequence) input
# Autograd off: decode; the forced paths (what "auto" picks there is the same graph). Autograd on
# (prefill, training): "auto", which dequantizes.
GRAD = {"no_grad": False, "grad": True}
PATHS_OF = {"no_grad": ("fused", "dequantize"), "grad": ("auto",)}


def layers_of_case(case: str, g: torch.Generator) -> list:
    """The case's layer once per matmul path (sharing one packed weight and state)."""
    compute, bias, _, qt, dq, k, n, block = CASES[case]
    linear = nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        if bias is not None:  # magnitudes up to ~10: most are not bf16/fp16 values
            linear.bias.copy_(torch.randn(n, generator=g) * 4)
    base = Linear4bit.from_linear(linear.to(bias or F32), block, qt, dq, compute)
    out = []
    for path in PATHS:
        layer = Linear4bit(k, n, base.packed, base.quant_state, base.bias, compute).eval()
        layer.matmul_path = path
        out.append(layer)
    return out


class Bank(nn.Module):
    """Every (case, path) layer, each called on 1, 8 and 16 rows: one graph covers them all."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(23)
        self.keys = [(case, path) for case in CASES for path in PATHS]
        self.layers = nn.ModuleList(layer for case in CASES for layer in layers_of_case(case, g))

    def forward(self, inputs: dict, paths: tuple) -> dict:
        return {(case, path, rows): layer(xs[case])
                for rows, xs in inputs.items()
                for (case, path), layer in zip(self.keys, self.layers) if path in paths}


def inputs() -> dict:
    """{rows: {case: x}}, x of the case's input dtype and in_features."""
    g = torch.Generator().manual_seed(0)
    return {rows: {case: torch.randn(*shape, c[5], generator=g).to(c[2])
                   for case, c in CASES.items()}
            for rows, shape in ROWS.items()}


@pytest.fixture(scope="module")
def outcome() -> dict:
    """{(grad, case, path, rows): (fused?, mismatch or None)}, eager vs compiled, from one compiled
    module (two graphs: without and with autograd)."""
    if ops.kernel_status("cpu") is not True:
        pytest.fail(f"the fused CPU kernel is not available: {ops.kernel_status('cpu')}")
    bank, found = Bank(), {}
    # emulate_precision_casts=False (inductor's default) is the setting that folds cast pairs.
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True), \
            torch._inductor.config.patch(emulate_precision_casts=False, compile_threads=1):
        torch._dynamo.reset()
        compiled = torch.compile(bank, fullgraph=True)
        for grad_name, grad in GRAD.items():
            xs = inputs()
            with torch.set_grad_enabled(grad):
                eager, got = bank(xs, PATHS_OF[grad_name]), compiled(xs, PATHS_OF[grad_name])
                for (case, path, rows), e in eager.items():
                    layer = bank.layers[bank.keys.index((case, path))]
                    fused = layer.uses_fused(xs[rows][case].to(layer.compute_dtype))
                    c = got[case, path, rows]
                    assert e.dtype == c.dtype and e.shape == c.shape
                    found[grad_name, case, path, rows] = (fused, byte_mismatch(e.detach(),
                                                                               c.detach()))
        torch._dynamo.reset()
    return found


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("grad,path", [(g, p) for g in GRAD for p in PATHS_OF[g]])
def test_compiled_equals_eager(outcome, grad, path, rows):
    """Every case (compute dtype float32/float16/bfloat16, bias or none, mixed input and bias
    dtypes) gives the eager bytes compiled; the path taken is the one named ("auto": fused for at
    most q4lab.matmul.fused_max_rows() rows without autograd, dequantize otherwise)."""
    fused_expected = path == "fused" or (
        path == "auto" and not GRAD[grad] and rows <= q4lab.matmul.fused_max_rows())
    found = []
    for case in CASES:
        fused, mismatch = outcome[grad, case, path, rows]
        assert fused == fused_expected, (case, fused)
        if mismatch is not None:
            found.append(f"{case}: {mismatch}")
    assert not found, f"{grad}, {path} path, {rows} rows: " + "; ".join(found)


def test_the_fused_op_takes_the_bias_in_its_compute_dtype():
    """The op widens a float16/bfloat16 bias exactly, as float32 would: same bytes as passing
    ``bias.float()``, and the rounded bias, not the float32 one, is what a layer adds."""
    layer = layers_of_case("bf16+bias", torch.Generator().manual_seed(1))[0]
    x = inputs()[1]["bf16+bias"]
    args = q4lab.matmul.kernel_args(layer.packed, layer.quant_state)
    rounded = layer.bias.to(BF16)
    widened = torch.ops.q4lab.matmul_4bit(x, *args, rounded.float(), "auto")
    assert byte_mismatch(widened, torch.ops.q4lab.matmul_4bit(x, *args, rounded, "auto")) is None
    with torch.no_grad():
        assert byte_mismatch(widened, layer(x)) is None
        unrounded = torch.ops.q4lab.matmul_4bit(x, *args, layer.bias, "auto")
    assert byte_mismatch(widened, unrounded) is not None  # the rounding is visible in the output
    for dtype in (F16, BF16):  # schema, fake (shapes for torch.compile) and autograd registration
        torch.library.opcheck(torch.ops.q4lab.matmul_4bit.default,
                              (x.to(dtype), *args, layer.bias.to(dtype), "auto"))
    with pytest.raises(RuntimeError, match="bias must be a contiguous 1-D float32, float16"):
        torch.ops.q4lab.matmul_4bit(x, *args, layer.bias.double(), "auto")
