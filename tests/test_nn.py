"""quantize_model, Q4Config, report and save/load on small synthetic models (fast, no downloads).

Checks against the source of truth: every replaced layer holds exactly the bytes that
``q4lab.quantize_4bit`` gives for the original weight (compared byte for byte), the report's totals
are the bytes of the tensors really stored, and a save/load round trip reproduces packed bytes and
layer outputs exactly. Bad input must raise a clear error and leave the model unchanged.
"""
import ast
import gc
import json
import math
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import q4lab
from q4lab import Linear4bit, Q4Config, testing

CFG32 = dict(compute_dtype=torch.float32)


class TinyLM(nn.Module):
    """Embedding -> two blocks (attn q/k/v/o, mlp up/down) -> lm_head tied to the embedding."""

    def __init__(self, vocab=97, d=64, hidden=160, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.attn = nn.ModuleDict({k: nn.Linear(d, d, bias=k != "o") for k in "qkvo"})
            blk.up, blk.down = nn.Linear(d, hidden), nn.Linear(hidden, d, bias=False)
            blk.gate = nn.Linear(d, 3)  # tiny: below min_numel
            self.blocks.append(blk)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.blocks:
            a = sum(blk.attn[k](h) for k in "qkv")
            h = h + blk.attn["o"](torch.tanh(a))
            h = h + blk.down(torch.relu(blk.up(h))) + blk.gate(h).sum(-1, keepdim=True)
        return self.lm_head(h)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw).eval()


def linear_names(model, cls=nn.Linear):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def snapshot(model):
    """Bytes of every tensor in the model, for 'unchanged' checks."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            out[n + ".absmax"] = m.quant_state.absmax.clone()
    return out


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        testing.assert_bytes_equal(before[k], after[k], k)


IDS = torch.arange(24).reshape(2, 12) % 97


# ---- Q4Config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    (dict(quant_type="nf3"), ValueError, "quant_type"),
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(compute_dtype=torch.float64), TypeError, "compute_dtype"),
    (dict(skip_modules=("lm_head", 3)), TypeError, "skip_modules"),
    (dict(min_numel=-1), ValueError, "min_numel"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(double_quant="yes"), TypeError, "double_quant"),
])
def test_config_rejects_bad_values(kw, err, match):
    with pytest.raises(err, match=match):
        Q4Config(**kw)


def test_config_accepts_dtype_names_and_quantize_model_overrides():
    assert Q4Config(compute_dtype="float16").compute_dtype == torch.float16
    assert Q4Config(compute_dtype="torch.bfloat16").compute_dtype == torch.bfloat16
    model = q4lab.quantize_model(tiny(), quant_type="fp4", blocksize=32, progress=False)
    assert model.blocks[0].up.quant_state.quant_type == "fp4"
    assert model.blocks[0].up.quant_state.blocksize == 32
    with pytest.raises(TypeError, match="unknown options"):
        q4lab.quantize_model(tiny(), block_size=32)


def test_config_defaults_are_qlora():
    c = Q4Config()
    assert (c.quant_type, c.blocksize, c.double_quant, c.compute_dtype) == \
        ("nf4", 64, True, torch.bfloat16)
    assert c.skips("lm_head") and c.skips("model.lm_head") and not c.skips("model.lm_headx")
    assert Q4Config(skip_modules="attn.o").skips("blocks.1.attn.o")
    assert not Q4Config(skip_modules="attn.o").skips("blocks.1.attn.q")


# ---- quantize_model -----------------------------------------------------------------------------
def test_quantize_model_replaces_the_right_layers_with_exact_bytes():
    model = tiny(tie=False)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    q4lab.quantize_model(model, Q4Config(skip_modules=("lm_head", "attn.o"), **CFG32),
                         progress=False)
    quantized = linear_names(model, Linear4bit)
    expected = sorted(n for n in originals if not n.endswith(("lm_head", "attn.o", "gate")))
    assert quantized == expected
    assert sorted(linear_names(model)) == sorted(set(originals) - set(expected))
    for name in quantized:
        layer = model.get_submodule(name)
        packed, state = q4lab.quantize_4bit(originals[name], 64, "nf4", True)
        testing.assert_bytes_equal(packed, layer.packed, f"{name} packed")
        testing.assert_states_equal(state, layer.quant_state, name)
        assert layer.compute_dtype == torch.float32


def test_quantize_model_output_equals_layerwise_linear4bit():
    model, ref = tiny(), tiny()
    q4lab.quantize_model(model, Q4Config(quant_type="fp4", blocksize=32, double_quant=False,
                                         **CFG32), progress=False)
    for name in linear_names(model, Linear4bit):
        setattr_path(ref, name, Linear4bit.from_linear(ref.get_submodule(name), 32, "fp4", False,
                                                       torch.float32))
    with torch.no_grad():
        testing.assert_bytes_equal(ref(IDS), model(IDS), "logits")


def setattr_path(model, name, module):
    q4lab.nn.set_submodule(model, name, module)


def test_quantize_model_is_idempotent_and_returns_model():
    model = tiny()
    assert q4lab.quantize_model(model, progress=False) is model
    packed = {n: model.get_submodule(n).packed for n in linear_names(model, Linear4bit)}
    q4lab.quantize_model(model, Q4Config(quant_type="fp4", min_numel=0), progress=False)
    for n, p in packed.items():
        assert model.get_submodule(n).packed is p, n
    assert "blocks.0.gate" in linear_names(model, Linear4bit)  # min_numel=0 took the tiny one


def test_tied_lm_head_quantized_embedding_kept():
    model = tiny()
    emb = model.embed.weight.detach().clone()
    q4lab.quantize_model(model, Q4Config(skip_modules=(), **CFG32), progress=False)
    assert isinstance(model.lm_head, Linear4bit)
    testing.assert_bytes_equal(emb, model.embed.weight, "embedding")
    packed, _ = q4lab.quantize_4bit(emb, 64, "nf4", True)
    testing.assert_bytes_equal(packed, model.lm_head.packed, "lm_head")
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_shared_linear_weight_is_quantized_once():
    a, b = nn.Linear(64, 128), nn.Linear(64, 128)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), b)
    q4lab.quantize_model(model, progress=False)
    assert model[0].packed is model[4].packed
    assert model[0].quant_state is model[4].quant_state


def test_full_precision_weights_are_freed():
    model = tiny(tie=False)
    refs = {n: weakref.ref(model.get_submodule(n).weight) for n in linear_names(model)}
    q4lab.quantize_model(model, progress=False)
    gc.collect()
    quantized = set(linear_names(model, Linear4bit))
    alive = sorted(n for n in quantized if refs[n]() is not None)
    assert quantized and not alive, f"weights still referenced: {alive}"


@pytest.mark.parametrize("poison, err, match", [
    ("float64", TypeError, "float64"), ("nan", ValueError, "NaN")])
def test_bad_layer_is_reported_before_anything_changes(poison, err, match):
    model = tiny(tie=False)
    if poison == "float64":
        model.blocks[1].up = model.blocks[1].up.double()
    else:
        with torch.no_grad():
            model.blocks[1].up.weight[3, 5] = float("nan")
    names = linear_names(model)
    with pytest.raises(err, match=match) as info:
        q4lab.quantize_model(model, progress=False)
    assert "blocks.1.up" in str(info.value)
    assert linear_names(model) == names and not linear_names(model, Linear4bit)


def test_quantize_model_rejects_non_config_and_bare_linear():
    with pytest.raises(TypeError, match="Q4Config"):
        q4lab.quantize_model(tiny(), {"quant_type": "nf4"})
    with pytest.raises(TypeError, match="from_linear"):
        q4lab.quantize_model(nn.Linear(128, 128))


@pytest.mark.cuda
def test_quantize_model_on_cuda_matches_cpu_bytes(tmp_path):
    cpu, gpu = quantized_tiny(), q4lab.quantize_model(tiny().cuda(), Q4Config(**CFG32),
                                                      progress=False)
    for n in linear_names(cpu, Linear4bit):
        a, b = cpu.get_submodule(n), gpu.get_submodule(n)
        assert b.packed.is_cuda and b.quant_state.absmax.is_cuda
        testing.assert_bytes_equal(a.packed, b.packed, n)
        testing.assert_states_equal(a.quant_state.numpy(), b.quant_state.numpy(), n)
    with torch.no_grad():
        assert torch.isfinite(gpu(IDS.cuda())).all()
    q4lab.save(gpu, tmp_path / "g.safetensors")
    back = q4lab.load(tiny(seed=4).cuda(), tmp_path / "g.safetensors")
    testing.assert_bytes_equal(gpu.blocks[1].down.packed, back.blocks[1].down.packed, "reload")
    assert back.blocks[1].down.packed.is_cuda


# ---- report --------------------------------------------------------------------------------------
def stored_bytes(layer):
    s = layer.quant_state
    parts = [layer.packed, s.absmax] + ([s.state2.absmax, s.offset] if s.nested else [])
    return sum(t.numel() * t.element_size() for t in parts)


@pytest.mark.parametrize("dq", [True, False])
def test_report_bytes_are_the_stored_tensors(dq):
    model = tiny(tie=False).to(torch.bfloat16)
    q4lab.quantize_model(model, Q4Config(double_quant=dq, blocksize=32), progress=False)
    rep = q4lab.report(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert [r["layer"] for r in rep.rows] == list(layers)
    for r in rep.rows:
        layer = layers[r["layer"]]
        assert r["bytes_after"] == stored_bytes(layer)
        assert r["bytes_before"] == layer.quant_state.numel * 2  # bf16 original
        assert r["bits_per_param"] == 8 * stored_bytes(layer) / layer.quant_state.numel
        assert r["mse"] is None
    assert rep.total["bytes_after"] == sum(stored_bytes(m) for m in layers.values())
    assert rep.total["bytes_saved"] == rep.total["bytes_before"] - rep.total["bytes_after"] > 0
    assert rep.model_bytes["before"] - rep.model_bytes["now"] == rep.total["bytes_saved"]


def test_report_errors_from_kept_stats_and_from_reference_agree():
    model, ref = tiny(tie=False), tiny(tie=False)
    q4lab.quantize_model(model, Q4Config(**CFG32), progress=False, keep_error_stats=True)
    kept, given = q4lab.report(model), q4lab.report(model, reference=ref)
    by_state_dict = q4lab.report(model, reference=ref.state_dict())
    for a, b, c in zip(kept.rows, given.rows, by_state_dict.rows):
        assert a["mse"] == b["mse"] == c["mse"] > 0
        assert a["max_abs_err"] == b["max_abs_err"] and a["sqnr_db"] == b["sqnr_db"]
        w = ref.get_submodule(a["layer"]).weight.double()
        w = w.detach()
        w_hat = model.get_submodule(a["layer"]).dequantized_weight(torch.float32).double()
        assert a["mse"] == float(((w_hat - w) ** 2).sum()) / w.numel()
    with pytest.raises(ValueError, match="shape"):
        q4lab.report(model, reference={n: torch.zeros(3, 3) for n in linear_names(ref)})


def test_report_displays():
    model = tiny()
    q4lab.quantize_model(model, progress=False, keep_error_stats=True)
    rep = q4lab.report(model, note="synthetic weights")
    html, text = rep._repr_html_(), str(rep)
    assert html.count("<tr>") == len(rep.rows) + 2 and "blocks.1.down" in html
    assert "TOTAL" in text and "synthetic weights" in text and "bits/param" in text
    assert isinstance(rep.rows[0], dict) and rep.total["layers"] == len(rep.rows)


# ---- save / load ---------------------------------------------------------------------------------
def quantized_tiny(**cfg):
    model = tiny()
    return q4lab.quantize_model(model, Q4Config(**{**CFG32, **cfg}), progress=False)


@pytest.mark.parametrize("cfg", [dict(), dict(quant_type="fp4", blocksize=128, double_quant=False)])
def test_save_load_round_trip_into_fresh_model(tmp_path, cfg):
    model = quantized_tiny(**cfg)
    q4lab.save(model, tmp_path / "m.safetensors")
    fresh = q4lab.load(tiny(seed=1), tmp_path / "m.safetensors")
    assert linear_names(fresh, Linear4bit) == linear_names(model, Linear4bit)
    for n in linear_names(model, Linear4bit):
        a, b = model.get_submodule(n), fresh.get_submodule(n)
        testing.assert_bytes_equal(a.packed, b.packed, n)
        testing.assert_states_equal(a.quant_state, b.quant_state, n)
        assert b.compute_dtype == a.compute_dtype
    assert fresh.lm_head.weight is fresh.embed.weight  # tie survives, stored once
    with torch.no_grad():
        testing.assert_bytes_equal(model(IDS), fresh(IDS), "logits")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.up.weight.quant_state.bitsandbytes__" + model.blocks[0].up.quant_state \
        .quant_type in keys and "lm_head.weight" not in keys


def test_load_into_quantized_model_updates_in_place(tmp_path):
    src, dst = quantized_tiny(), q4lab.quantize_model(tiny(seed=5), Q4Config(**CFG32),
                                                      progress=False)
    q4lab.save(src, tmp_path / "m.safetensors")
    layer = dst.blocks[0].up
    q4lab.load(dst, tmp_path / "m.safetensors")
    assert dst.blocks[0].up is layer
    testing.assert_bytes_equal(src.blocks[0].up.packed, layer.packed, "packed")


def _rewrite(path, out, edit):
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    edit(tensors)
    save_file(tensors, str(out), metadata=meta)


K = "blocks.1.up.weight"


def _bad_json(t):
    t[K + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4", '),
                                                           dtype=torch.uint8)


def _bad_shape(t):
    meta = json.loads(bytes(t[K + ".quant_state.bitsandbytes__nf4"].numpy()))
    meta["shape"] = [64, 160]
    t[K + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                           dtype=torch.uint8)


CORRUPTIONS = {
    "bad JSON": (_bad_json, "JSON"),
    "wrong absmax dtype": (lambda t: t.update({K + ".absmax": t[K + ".absmax"].float()}), "dtype"),
    "missing nested_absmax": (lambda t: t.pop(K + ".nested_absmax"), "nested_absmax"),
    "packed too short": (lambda t: t.update({K: t[K][:-1]}), "shape"),
    "stored shape mismatch": (_bad_shape, "shape"),
    "missing plain key": (lambda t: t.pop("blocks.0.gate.bias"), "missing keys"),
    "missing 4-bit layer bias": (lambda t: t.pop("blocks.0.attn.q.bias"), "bias"),
    "unexpected key": (lambda t: t.update({"extra.thing": torch.zeros(2)}), "unexpected"),
    "wrong embedding shape": (lambda t: t.update({"embed.weight": torch.zeros(5, 64)}), "embed"),
    "altered quant_map": (lambda t: t[K + ".quant_map"].__setitem__(3, 0.5), "quant_map"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_load_rejects_corrupted_files_and_leaves_model_unchanged(tmp_path, name):
    edit, match = CORRUPTIONS[name]
    q4lab.save(quantized_tiny(), tmp_path / "m.safetensors")
    _rewrite(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", edit)
    for target in (tiny(seed=3), quantized_tiny(quant_type="fp4")):
        before = snapshot(target)
        with pytest.raises(ValueError, match=match):
            q4lab.load(target, tmp_path / "bad.safetensors")
        assert_unchanged(target, before)


def test_load_rejects_truncated_file(tmp_path):
    q4lab.save(quantized_tiny(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    target = tiny(seed=3)
    before = snapshot(target)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        q4lab.load(target, tmp_path / "t.safetensors")
    assert_unchanged(target, before)


def test_transformers_llama_with_tied_lm_head_quantized_generates_and_round_trips(tmp_path):
    """A randomly initialised transformers Llama (tied lm_head, GQA) with every Linear quantized:
    generate() runs, and save -> load into a fresh model reproduces the logits byte for byte."""
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    q4lab.quantize_model(model, Q4Config(skip_modules=(), min_numel=0, **CFG32), progress=False)
    assert isinstance(model.lm_head, Linear4bit) and len(linear_names(model, Linear4bit)) == 15
    ids = torch.randint(0, 320, (1, 7))
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 11)
    q4lab.save(model, tmp_path / "llama.safetensors")
    fresh = q4lab.load(tf.LlamaForCausalLM(cfg).eval(), tmp_path / "llama.safetensors")
    with torch.no_grad():
        testing.assert_bytes_equal(model(ids).logits, fresh(ids).logits, "logits")


def test_shared_linear_is_quantized_once_under_every_name():
    model = torch.nn.Sequential()
    model.a = torch.nn.Linear(128, 128)
    model.b = model.a
    q4lab.quantize_model(model, progress=False)
    assert isinstance(model.a, q4lab.Linear4bit) and model.b is model.a


def test_linear4bit_rejects_unsupported_compute_dtype():
    layer = torch.nn.Linear(64, 64)
    with pytest.raises(TypeError, match="compute_dtype"):
        q4lab.Linear4bit.from_linear(layer, compute_dtype=torch.float64)


def test_report_with_reference_after_add_lora():
    model = torch.nn.Sequential()
    model.q_proj = torch.nn.Linear(128, 128)
    model.v_proj = torch.nn.Linear(128, 128)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    q4lab.quantize_model(model, progress=False)
    q4lab.add_lora(model, r=4, alpha=8, target_modules=("q_proj",))
    rep = q4lab.report(model, reference=original)
    assert {row["layer"] for row in rep.rows} >= {"q_proj.base", "v_proj"}
    assert all(row["mse"] is not None for row in rep.rows)


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
