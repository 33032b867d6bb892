"""q4lab.nn's layer and the package's structure: Linear4bit's own checks (compute dtype, which
state dicts it accepts), the one SQNR rule (q4lab.metrics) and no import circle among q4lab's
modules (old names still resolve). quantize_model is tested in tests/test_quantize_model.py,
report in tests/test_report.py, save / load in tests/test_save_load.py.
"""
import ast
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import q4lab
from q4lab import Linear4bit, Q4Config


def test_linear4bit_rejects_unsupported_compute_dtype():
    layer = torch.nn.Linear(64, 64)
    with pytest.raises(TypeError, match="compute_dtype"):
        q4lab.Linear4bit.from_linear(layer, compute_dtype=torch.float64)


# ---- one SQNR rule (q4lab.metrics), one job per module, no import circle ------------------------
def test_error_stats_one_rule_for_numpy_and_torch():
    """``q4lab.metrics.error_stats`` is the one place the error numbers are computed (report,
    quantize_model, widgets). Its rule (the module docstring): SQNR =
    10 log10(sum w^2 / sum e^2); +inf when the reconstruction is exact (an all-zero weight
    included), -inf when there is noise and no signal; NumPy and torch inputs give equal numbers."""
    from q4lab.metrics import error_stats, sqnr_db

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w_hat = Linear4bit.from_linear(nn.Linear(96, 64), 64).dequantized_weight(torch.float32)
    cases = {"ordinary": (w, w + 0.01 * torch.randn(64, 96, generator=g)),
             "exact": (w, w.clone()), "all-zero weight, exact": (torch.zeros(8, 8),) * 2,
             "all-zero weight, noisy": (torch.zeros(8, 8), torch.full((8, 8), 1e-3)),
             "layer": (w_hat, w_hat.bfloat16())}
    want_sqnr = {"exact": float("inf"), "all-zero weight, exact": float("inf"),
                 "all-zero weight, noisy": float("-inf")}
    for name, (a, b) in cases.items():
        t, n = error_stats(a, b), error_stats(a.numpy(), b.float().numpy())
        assert t == n, (name, t, n)
        e = (b.double() - a.double())
        assert t["mse"] == float((e * e).sum()) / e.numel(), name
        expected = want_sqnr[name] if name in want_sqnr else \
            10 * math.log10(float((a.double() ** 2).sum()) / float((e * e).sum()))
        assert t["sqnr_db"] == expected, (name, t["sqnr_db"], expected)
    assert sqnr_db(0.0, 0.0) == float("inf") and sqnr_db(0.0, 1.0) == float("-inf")
    with pytest.raises(ValueError, match="sums of squares"):
        sqnr_db(-1.0, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        error_stats(torch.zeros(3), torch.zeros(4))


def test_all_zero_layer_quantizes_exactly_with_infinite_sqnr():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.zero_()
    q4lab.quantize_model(model, Q4Config(min_numel=0), progress=False, keep_error_stats=True)
    assert model[0].error_stats == {"mse": 0.0, "max_abs_err": 0.0, "sqnr_db": float("inf")}
    assert math.isfinite(model[1].error_stats["sqnr_db"])


def import_cycles(root) -> list:
    """Cycles among the imports of the ``q4lab`` package under ``root``, module-level and inside
    functions alike (a lazy import only hides a circle; PEP 562 ``__getattr__`` forwarding of old
    names through ``import_module`` is not an import statement and is not counted)."""
    files = {}
    for path in sorted((root / "q4lab").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                deps |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod
                         for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [node, dep])
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_circle_and_old_names_still_resolve(tmp_path):
    """nn.py holds the layer, quantize.py the model walk, files.py save/load, interop.py the
    bitsandbytes layout: no module imports one that imports it back. The names that lived in
    q4lab.nn before the split still resolve (lazily) for code outside the repository."""
    root = Path(q4lab.__file__).resolve().parent.parent
    assert import_cycles(root) == []
    import q4lab.nn as qnn

    assert (qnn.quantize_model, qnn.save, qnn.load) == (q4lab.quantize_model, q4lab.save,
                                                         q4lab.load)
    assert qnn.set_submodule is q4lab.quantize.set_submodule
    assert qnn.error_stats is q4lab.metrics.error_stats
    # the check can fail: a copy of the package where nn imports files (which imports nn)
    shutil.copytree(root / "q4lab", tmp_path / "q4lab", ignore=shutil.ignore_patterns("csrc"))
    nn_py = tmp_path / "q4lab" / "nn.py"
    nn_py.write_text(nn_py.read_text().replace("from . import ops\n",
                                               "from . import ops\n"
                                               "from .formats.safetensors_file import save\n", 1))
    assert any({"q4lab.nn", "q4lab.formats.safetensors_file"} <= set(c)
               for c in import_cycles(tmp_path))
    # and an import inside a function counts as well: lora's adapter files importing peft back
    nn_py.write_text((root / "q4lab" / "nn.py").read_text())
    lora_py = tmp_path / "q4lab" / "lora.py"
    lora_py.write_text(lora_py.read_text() + "\n\ndef _late():\n"
                       "    from .formats.peft import save_adapters\n")
    assert any({"q4lab.lora", "q4lab.formats.peft"} <= set(c) for c in import_cycles(tmp_path))


def test_load_state_dict_refuses_codes_it_cannot_pair_with_their_absmax():
    """Linear4bit's state dict carries only ``packed``: loading another layer's codes would keep
    this layer's absmax and decode silently to wrong weights, so it is refused with the way that
    works (from_bnb_state_dict), which then gives exactly the other layer's weights."""
    torch.manual_seed(3)
    a, b = (nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 16))) for _ in range(2))
    a.load_state_dict(a.state_dict())                      # its own codes: fine
    with pytest.raises(RuntimeError, match="from_bnb_state_dict"):
        a.load_state_dict(b.state_dict())
    q4lab.from_bnb_state_dict(a, q4lab.to_bnb_state_dict(b))
    assert torch.equal(a[0].dequantized_weight(), b[0].dequantized_weight())
