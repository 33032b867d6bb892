"""The 4-bit landscape on a real model (``q4lab.landscape``): every quantizable format round-trips
the chosen layers and puts the float weights back; KL, top-1 and perplexity are measured against
the float model; on SmolLM2 (whose weights came from GGUF Q4_1) q4lab's Q4_1 reproduces the
weights exactly while every other format changes them."""
from __future__ import annotations

import pytest
import torch

from q4lab import landscape


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("q4lab.models")
    try:
        return models.load_smollm2()
    except Exception as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")


def test_specs_and_equal_bits():
    assert landscape.FormatSpec("mxfp4").blocksize == 32
    assert landscape.FormatSpec("nf4").double_quant is True
    with pytest.raises(ValueError, match="no quantizer"):
        landscape.FormatSpec("q4_k")
    with pytest.raises(ValueError, match="fixed block"):
        landscape.FormatSpec("nvfp4", 32)
    labels = [(a.label, b.label) for a, b in landscape.EQUAL_BITS]
    assert labels[0] == ("NF4+DQ/64", "NF4/256")


def test_landscape_on_smollm2(smollm2):
    from q4lab import quality

    model, tokenizer = smollm2
    ids = quality.text_tokens(tokenizer, tokens=64)
    names = [n for n in landscape.linear_names(model) if ".layers.0." in n or ".layers.1." in n]
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}
    specs = (landscape.FormatSpec("nf4", 64, True), landscape.FormatSpec("q4_1"),
             landscape.FormatSpec("nvfp4"))
    rows = landscape.compare(model, ids, specs, names=names, progress=False)
    assert [r["label"] for r in rows] == ["float", "NF4+DQ/64", "Q4_1/32", "NVFP4/16"]
    assert rows[0]["kl"] == 0 and rows[0]["top1"] == 1
    by = {r["label"]: r for r in rows}
    assert by["Q4_1/32"]["kl"] == 0.0  # SmolLM2 is stored in Q4_1: its grid holds every weight
    assert by["NF4+DQ/64"]["kl"] > 0 and by["NVFP4/16"]["kl"] > 0
    assert abs(by["NF4+DQ/64"]["bits_per_param"] - 4.127) < 0.01
    for n, m in model.named_modules():
        if n in names:
            assert torch.equal(m.weight, before[n])
