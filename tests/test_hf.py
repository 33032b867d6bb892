"""q4lab.save_pretrained / q4lab.from_pretrained against real transformers 5 + bitsandbytes 0.50.2.

Claims, each checked on a tiny random Llama (most cases) and on SmolLM2-135M (end to end):
- a directory q4lab writes loads with ``AutoModelForCausalLM.from_pretrained`` + bitsandbytes, the
  bnb layers hold q4lab's bytes, and the logits are identical (float32 compute);
- a directory transformers + bitsandbytes write opens in q4lab with bitsandbytes hidden, as
  ``q4lab.Linear4bit`` layers holding the file's bytes, with identical logits; report and widgets
  work on it; what q4lab cannot open is refused with a message naming it.

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks every 4-bit weight on the first eval-mode
forward (``nn/modules.py::Linear4bit.forward`` -> ``functional.py::_convert_weight_packed_for_cpu``)
and rounds its absmax to bfloat16, so its logits then differ from its own ``dequantize_4bit``.
``helpers.exact_bnb`` (tests/helpers.py) turns that repacking off so bnb computes dequantize +
matmul as on other CPUs; the test of that effect says how large it is. Inputs have more rows than
q4lab's fused path takes (q4lab.matmul.fused_max_rows()), so both sides compute dequantize +
F.linear.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import q4lab
from q4lab.formats import hf
from q4lab.testing import assert_bytes_equal

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
from helpers import bnb_load, tiny_llama  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

F32 = torch.float32


def tokens(seed=1, batch=2, length=24, vocab=256):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def q4_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, q4lab.Linear4bit)}


def assert_same_layer_bytes(q4_model, bnb_model):
    layers = q4_layers(q4_model)
    assert layers
    for name, layer in layers.items():
        theirs = bnb_model.get_submodule(name)
        assert isinstance(theirs, bnb.nn.Linear4bit), name
        assert_bytes_equal(layer.packed, theirs.weight.data.reshape(-1), f"{name} packed")
        qs = theirs.weight.quant_state
        assert_bytes_equal(layer.quant_state.absmax, qs.absmax, f"{name} absmax")
        if layer.quant_state.nested:
            assert_bytes_equal(layer.quant_state.state2.absmax, qs.state2.absmax, f"{name} absmax2")
            assert layer.quant_state.offset_value == float(qs.offset)


# ---- the config transformers reads -----------------------------------------------------------
def test_quantization_config_is_what_transformers_writes():
    for qt, dq, dtype in (("nf4", True, F32), ("fp4", False, torch.bfloat16)):
        ours = hf.bnb_quantization_config(qt, dq, dtype, ["model.layers.0.mlp.up_proj", "lm_head"])
        theirs = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt,
                                    bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=dtype,
                                    llm_int8_skip_modules=["lm_head", "model.layers.0.mlp.up_proj"])
        assert ours == theirs.to_dict()


# ---- q4lab -> transformers + bitsandbytes ------------------------------------------------------
# blocksizes divide in_features (64, 128): bnb's AVX-512 dequantize reads absmax per row and
# misplaces blocks that straddle rows (docs/bitsandbytes.md; tests/test_interop.py)
@pytest.mark.parametrize("quant_type, blocksize, dq, tie", [("nf4", 64, True, True),
                                                           ("fp4", 32, False, False)])
def test_save_pretrained_loads_in_transformers_bnb_identical_logits(tmp_path, quant_type,
                                                                    blocksize, dq, tie):
    model = tiny_llama(tie=tie)
    cfg = q4lab.Q4Config(quant_type=quant_type, blocksize=blocksize, double_quant=dq,
                         compute_dtype=F32)  # min_numel 4096 keeps k_proj/v_proj (2048) dense
    q4lab.quantize_model(model, cfg, progress=False)
    dense = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert "model.layers.0.self_attn.k_proj" in dense and "lm_head" in dense
    q4lab.save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["llm_int8_skip_modules"] == dense
    assert config["quantization_config"]["bnb_4bit_quant_type"] == quant_type
    theirs = bnb_load(tmp_path / "out")
    assert sorted(n for n, m in theirs.named_modules() if type(m) is torch.nn.Linear) == dense
    assert_same_layer_bytes(model, theirs)
    ids = tokens()
    assert_bytes_equal(logits(model, ids), logits(theirs, ids), "logits q4lab vs bnb")


def test_save_pretrained_shards_with_index_and_tied_embedding_written_once(tmp_path):
    model = q4lab.quantize_model(tiny_llama(), compute_dtype=F32, min_numel=0, progress=False)
    q4lab.save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files, files
    assert not any(f.startswith(".") for f in files)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: transformers re-ties it
    quant_state_key = "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"
    assert quant_state_key in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _read_all(tmp_path / "out").values())
    theirs = bnb_load(tmp_path / "out")
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    ids = tokens(2)
    assert_bytes_equal(logits(model, ids), logits(theirs, ids), "logits from shards")


def _read_all(directory) -> dict:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(p)))
    return out


def test_quantized_output_layer_is_untied_in_the_saved_config(tmp_path):
    model = q4lab.quantize_model(tiny_llama(tie=True), compute_dtype=F32, skip_modules=(),
                                 progress=False)
    assert isinstance(model.lm_head, q4lab.Linear4bit)
    q4lab.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "tie_word_embeddings"] is False
    theirs = bnb_load(tmp_path / "out")
    assert isinstance(theirs.lm_head, bnb.nn.Linear4bit)
    ids = tokens(3)
    assert_bytes_equal(logits(model, ids), logits(theirs, ids), "logits, 4-bit lm_head")


def test_save_pretrained_refuses_what_transformers_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="transformers model"):
        q4lab.save_pretrained(torch.nn.Sequential(torch.nn.Linear(64, 64)), tmp_path / "a")
    with pytest.raises(ValueError, match="no 4-bit layers"):
        q4lab.save_pretrained(tiny_llama(), tmp_path / "b")
    model = q4lab.quantize_model(tiny_llama(), compute_dtype=F32, progress=False)
    model.model.layers[1].mlp.up_proj.compute_dtype = torch.bfloat16
    with pytest.raises(ValueError, match="different compute dtypes"):
        q4lab.save_pretrained(model, tmp_path / "c")
    int4 = q4lab.quantize_model(tiny_llama(), quant_type="int4", progress=False)
    with pytest.raises(ValueError, match="no bitsandbytes equivalent"):
        q4lab.save_pretrained(int4, tmp_path / "d")
    assert not any(tmp_path.iterdir()), "a refused save left files behind"


def test_save_pretrained_into_an_existing_directory_replaces_old_shards(tmp_path):
    model = q4lab.quantize_model(tiny_llama(), compute_dtype=F32, min_numel=0, progress=False)
    q4lab.save_pretrained(model, tmp_path / "out", max_shard_size="30KB")
    (tmp_path / "out" / "notes.txt").write_text("kept")
    q4lab.save_pretrained(model, tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]


# ---- transformers + bitsandbytes -> q4lab ------------------------------------------------------
@pytest.fixture(scope="module")
def bnb_written(tmp_path_factory):
    """A tiny Llama quantized and saved by transformers + bitsandbytes themselves."""
    root = tmp_path_factory.mktemp("bnb")
    tiny_llama(tie=False).save_pretrained(root / "fp32")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=F32)
    model = AutoModelForCausalLM.from_pretrained(str(root / "fp32"), quantization_config=qc,
                                                 device_map="cpu")
    model.save_pretrained(root / "bnb")
    return root / "bnb"


def test_from_pretrained_opens_a_bnb_directory_with_the_files_bytes(bnb_written):
    from safetensors.torch import load_file

    model = q4lab.from_pretrained(bnb_written)
    stored = load_file(str(bnb_written / "model.safetensors"))
    layers = q4_layers(model)
    assert len(layers) == 14 and not any(
        isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for name, layer in layers.items():
        assert_bytes_equal(layer.packed, stored[f"{name}.weight"].reshape(-1), name)
        assert_bytes_equal(layer.quant_state.absmax, stored[f"{name}.weight.absmax"], name)
        assert layer.compute_dtype == F32
    theirs = bnb_load(bnb_written)
    assert_same_layer_bytes(model, theirs)
    ids = tokens(4)
    assert_bytes_equal(logits(model, ids), logits(theirs, ids), "logits bnb dir in q4lab")
    rep = q4lab.report(model)
    assert rep.total["layers"] == 14 and 4.1 < rep.total["bits_per_param"] < 4.2
    dash = q4lab.widgets.model_dashboard(model)
    assert dash is not None


def test_from_pretrained_without_bitsandbytes(bnb_written, tmp_path):
    """A child interpreter where ``import bitsandbytes`` fails (``sys.modules`` entry None, the
    documented way to make an import fail) opens the directory; the parent compares."""
    out = tmp_path / "child.pt"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None
        import torch, transformers.utils, q4lab
        assert not transformers.utils.is_bitsandbytes_available()
        try:
            import bitsandbytes
            raise SystemExit("bitsandbytes is importable")
        except ImportError:
            pass
        model = q4lab.from_pretrained({str(bnb_written)!r})
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            lg = model(ids).logits
        loaded = sorted(m for m in sys.modules if m.startswith("bitsandbytes") and sys.modules[m])
        packed = {{n: m.packed for n, m in model.named_modules()
                   if isinstance(m, q4lab.Linear4bit)}}
        torch.save({{"logits": lg, "packed": packed, "bnb_modules": loaded}}, {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(out)
    assert child["bnb_modules"] == []
    assert len(child["packed"]) == 14
    theirs = bnb_load(bnb_written)
    for name, packed in child["packed"].items():
        assert_bytes_equal(packed, theirs.get_submodule(name).weight.data.reshape(-1), name)
    assert_bytes_equal(child["logits"], logits(theirs, tokens(4)), "logits without bnb")


def test_bnb_avx512bf16_repacking_changes_its_logits(bnb_written):
    """What ``exact_bnb`` turns off, measured: on an AVX512-BF16 CPU bnb's own default forward
    differs from q4lab (and from bnb's dequantize_4bit); elsewhere it is identical."""
    ours = logits(q4lab.from_pretrained(bnb_written), tokens(5))
    default = AutoModelForCausalLM.from_pretrained(str(bnb_written), device_map="cpu")
    theirs = logits(default, tokens(5))
    if bnb.functional.has_avx512bf16():
        diff = (ours - theirs).abs().max().item()
        assert 0 < diff < 0.05, diff
        assert default.model.layers[0].mlp.up_proj.weight.quant_state.absmax.dtype == \
            torch.bfloat16
    else:
        assert_bytes_equal(ours, theirs, "logits, default bnb path")


def test_from_pretrained_gpt2_conv1d_layers(tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored in x out);
    transformers + bnb quantize them transposed, as Linear; q4lab opens them as Linear4bit."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                     n_positions=64)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "fp32")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=F32)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), quantization_config=qc,
                                         device_map="cpu").save_pretrained(tmp_path / "bnb")
    ours = q4lab.from_pretrained(tmp_path / "bnb")
    layers = q4_layers(ours)
    assert len(layers) == 8 and "transformer.h.0.attn.c_attn" in layers
    assert layers["transformer.h.0.attn.c_attn"].quant_state.shape == (192, 64)
    ids = tokens(6)
    assert_bytes_equal(logits(ours, ids), logits(bnb_load(tmp_path / "bnb"), ids), "GPT-2 logits")


def _edit_config(src, dst, change):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), "'gptq' is not supported"),
    (lambda c: c["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False,
                                               load_in_8bit=True, _load_in_8bit=True),
     "8-bit checkpoints are not supported"),
    (lambda c: c["quantization_config"].update(bnb_4bit_quant_storage="bfloat16"),
     "says bnb_4bit_quant_storage 'bfloat16' but .* is stored as uint8"),
])
def test_from_pretrained_names_what_it_does_not_support(bnb_written, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        q4lab.from_pretrained(_edit_config(bnb_written, tmp_path / "x", change))


def test_from_pretrained_refuses_a_real_8bit_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "fp32"), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu")
    model.save_pretrained(tmp_path / "int8")
    with pytest.raises(ValueError, match="8-bit checkpoints are not supported"):
        q4lab.from_pretrained(tmp_path / "int8")


def test_from_pretrained_refuses_tensors_it_has_no_place_for(bnb_written, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _edit_config(bnb_written, tmp_path / "x", lambda c: None)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.SCB"] = torch.ones(128)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for.*up_proj.SCB"):
        q4lab.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        q4lab.from_pretrained(tmp_path)


# ---- SmolLM2-135M end to end ---------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_both_ways(tmp_path):
    """SmolLM2 quantized by q4lab, saved with its tokenizer, loaded by transformers + bnb
    (identical logits on a real prompt), and back into q4lab (identical bytes and logits)."""
    model, tok = q4lab.models.load_smollm2()
    q4lab.quantize_model(model, compute_dtype=F32, progress=False)
    q4lab.save_pretrained(model, tmp_path / "smol", tokenizer=tok)
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    files = {p.name for p in (tmp_path / "smol").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= files
    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "smol"))
    text = ("QLoRA stores the frozen base model in 4-bit NormalFloat with double quantization "
            "and trains low-rank adapters in 16-bit.")
    ids = tok2(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 16 and torch.equal(ids, tok(text, return_tensors="pt")["input_ids"])
    theirs = bnb_load(tmp_path / "smol")
    assert_same_layer_bytes(model, theirs)
    ours = logits(model, ids)
    assert_bytes_equal(ours, logits(theirs, ids), "SmolLM2 logits q4lab vs bnb")
    back = q4lab.from_pretrained(tmp_path / "smol")
    for name, layer in q4_layers(model).items():
        assert_bytes_equal(layer.packed, back.get_submodule(name).packed, name)
    assert_bytes_equal(ours, logits(back, ids), "SmolLM2 logits after the round trip")
