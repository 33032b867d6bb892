"""PEFT adapter directories both ways, against real peft 0.21 over a real transformers +
bitsandbytes 0.50.2 base (a tiny random Llama).

- ``q4lab.save_adapters(model, directory)`` writes ``adapter_config.json`` +
  ``adapter_model.safetensors`` with PEFT's keys; ``peft.PeftModel.from_pretrained`` over the base
  that ``q4lab.save_pretrained`` wrote gives q4lab's outputs (PEFT's bnb LoRA forward is
  ``base(x) + lora_B(lora_A(x)) * alpha / r``, the same operations in the same order, so the
  comparison is by bytes; "within float32 rounding" is the most the issue asks).
- ``q4lab.load_adapters(model, directory)`` reads what ``PeftModel.save_pretrained`` wrote.
- Adapter options q4lab does not compute are refused by name.
Sources: peft ``utils/save_and_load.py`` (key names), ``tuners/lora/bnb.py::Linear4bit.forward``.
"""
from __future__ import annotations

import json

import pytest
import torch

import q4lab
from q4lab.testing import assert_bytes_equal

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from helpers import bnb_load, exact_bnb, tiny_llama  # noqa: E402

F32 = torch.float32


def tiny_quantized(seed=0):
    model = tiny_llama(seed, tie=False)
    return q4lab.quantize_model(model, compute_dtype=F32, min_numel=0, progress=False)


def randomize_lora_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model):
    return model(IDS).logits


@pytest.fixture(scope="module")
def q4_with_adapters(tmp_path_factory):
    """(q4lab model with LoRA on q_proj/v_proj, its base directory, its adapter directory)."""
    root = tmp_path_factory.mktemp("peft")
    model = tiny_quantized()
    q4lab.save_pretrained(model, root / "base")
    q4lab.add_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    randomize_lora_B(model)
    q4lab.save_adapters(model, root / "adapter")
    return model, root / "base", root / "adapter"


def test_save_adapters_writes_peft_layout(q4_with_adapters):
    from safetensors.torch import load_file

    model, _, adapter = q4_with_adapters
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8)
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 8
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    assert_bytes_equal(model.model.layers[1].self_attn.v_proj.lora_A.weight, a, "lora_A")
    assert peft.LoraConfig.from_pretrained(str(adapter)).r == 4


def test_peft_loads_q4lab_adapters_over_the_bnb_base(q4_with_adapters):
    model, base, adapter = q4_with_adapters
    theirs = PeftModel.from_pretrained(bnb_load(base), str(adapter)).eval()
    wrapped = [n for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.bnb.Linear4bit)]
    assert len(wrapped) == 4
    ours = logits(model)
    assert not torch.equal(ours, logits(bnb_load(base)))  # the adapters change the output
    assert_bytes_equal(ours, logits(theirs), "logits q4lab LoRA vs PEFT over bnb")


def test_load_adapters_reads_what_peft_wrote(q4_with_adapters, tmp_path):
    _, base, _ = q4_with_adapters
    theirs = get_peft_model(bnb_load(base), LoraConfig(r=8, lora_alpha=16,
                                                       target_modules=["k_proj", "down_proj"]))
    randomize_lora_B(theirs, seed=3)
    theirs.eval().save_pretrained(str(tmp_path / "peft_adapter"))
    ours = q4lab.from_pretrained(base)
    q4lab.load_adapters(ours, tmp_path / "peft_adapter")
    layers = q4lab.lora.lora_layers(ours)
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                    for m in ("self_attn.k_proj", "mlp.down_proj"))
    assert {(m.r, m.scaling) for m in layers.values()} == {(8, 2.0)}
    assert_bytes_equal(logits(theirs), logits(ours), "logits PEFT adapters in q4lab")
    # and back: q4lab writes them out again, PEFT reads them, same outputs
    q4lab.save_adapters(ours, tmp_path / "again")
    again = PeftModel.from_pretrained(bnb_load(base), str(tmp_path / "again")).eval()
    assert_bytes_equal(logits(ours), logits(again), "logits after a second round trip")


def test_single_file_form_still_works(q4_with_adapters, tmp_path):
    model, base, _ = q4_with_adapters
    meta = q4lab.save_adapters(model, tmp_path / "a.safetensors")
    assert meta["format"] == "q4lab.lora/1"
    fresh = q4lab.load_adapters(q4lab.from_pretrained(base), tmp_path / "a.safetensors")
    assert_bytes_equal(logits(model), logits(fresh), "single-file adapters")


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora"), ({"use_rslora": True}, "use_rslora"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"), ({"bias": "all"}, "bias='all'"),
])
def test_load_adapters_refuses_what_it_does_not_compute(q4_with_adapters, tmp_path, change,
                                                         message):
    import shutil

    _, base, adapter = q4_with_adapters
    shutil.copytree(adapter, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg.update(change)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        q4lab.load_adapters(q4lab.from_pretrained(base), tmp_path / "a")


def test_load_adapters_errors_on_broken_directories(q4_with_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    model, base, adapter = q4_with_adapters
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        q4lab.load_adapters(q4lab.from_pretrained(base), tmp_path / "empty")
    import shutil

    shutil.copytree(adapter, tmp_path / "half")
    sd = load_file(str(tmp_path / "half" / "adapter_model.safetensors"))
    sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(sd, str(tmp_path / "half" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="only one of lora_A / lora_B"):
        q4lab.load_adapters(q4lab.from_pretrained(base), tmp_path / "half")
    sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 4)
    save_file(sd, str(tmp_path / "half" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected key .*lora_embedding_A"):
        q4lab.load_adapters(q4lab.from_pretrained(base), tmp_path / "half")
    other = q4lab.add_lora(q4lab.from_pretrained(base), r=2, alpha=8,
                           target_modules=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="does not match"):
        q4lab.load_adapters(other, adapter)


def test_save_adapters_records_the_base_model_peft_loads_it(q4_with_adapters, tmp_path):
    """A model opened with ``q4lab.from_pretrained(base)`` remembers ``base`` (transformers'
    ``name_or_path``); ``adapter_config.json`` names it, ``PeftModel.from_pretrained`` reads it
    and ``AutoPeftModelForCausalLM`` loads the base from it alone, giving q4lab's logits."""
    from peft import AutoPeftModelForCausalLM

    model, base, _ = q4_with_adapters
    ours = q4lab.from_pretrained(base)
    q4lab.add_lora(ours, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    randomize_lora_B(ours, seed=5)
    cfg = q4lab.save_adapters(ours, tmp_path / "adapter")
    on_disk = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == on_disk["base_model_name_or_path"] == str(base)
    theirs = PeftModel.from_pretrained(bnb_load(base), str(tmp_path / "adapter"))
    assert theirs.peft_config["default"].base_model_name_or_path == str(base)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), device_map="cpu")
    auto = exact_bnb(auto).eval()
    assert_bytes_equal(logits(ours), logits(auto), "logits PEFT loaded from the adapter alone")
    meta = q4lab.save_adapters(ours, tmp_path / "a.safetensors")
    assert meta["base_model_name_or_path"] == str(base)
    _, read_back = q4lab.formats.peft.read_adapters(tmp_path / "a.safetensors")
    assert read_back["base_model_name_or_path"] == str(base)


def test_save_adapters_base_model_given_unknown_and_refused(q4_with_adapters, tmp_path):
    from pathlib import Path

    model, base, _ = q4_with_adapters   # quantized in memory from a config: no name recorded
    assert q4lab.save_adapters(model, tmp_path / "a")["base_model_name_or_path"] is None
    assert "base_model_name_or_path" not in q4lab.save_adapters(model, tmp_path / "a.safetensors")
    given = q4lab.save_adapters(model, tmp_path / "b", base_model_name_or_path="org/tiny-llama")
    assert given["base_model_name_or_path"] == "org/tiny-llama"
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "b")).base_model_name_or_path == \
        "org/tiny-llama"
    as_path = q4lab.save_adapters(model, tmp_path / "c", base_model_name_or_path=Path(base))
    assert as_path["base_model_name_or_path"] == str(base)
    loaded = q4lab.from_pretrained(base)   # the caller's name wins over the recorded one
    q4lab.add_lora(loaded, r=4, alpha=8, target_modules=("q_proj",))
    assert q4lab.save_adapters(loaded, tmp_path / "d", base_model_name_or_path="org/x")[
        "base_model_name_or_path"] == "org/x"
    with pytest.raises(TypeError, match="as a str"):
        q4lab.save_adapters(model, tmp_path / "e", base_model_name_or_path=3)
    with pytest.raises(ValueError, match="is empty"):
        q4lab.save_adapters(model, tmp_path / "e", base_model_name_or_path=" ")
    assert not (tmp_path / "e").exists()
