"""GGUF files (``q4lab.formats.gguf``): a q4lab Q4_0 / Q4_1 tensor written into a GGUF file and
read back exactly, by q4lab and by the gguf package's ``GGUFReader`` (the anchor); a file the gguf
package writes (``GGUFWriter``, Q4_0 / Q4_K / IQ4_NL blocks) read by q4lab and dequantized as
``gguf.quants.dequantize`` does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import q4lab
from q4lab.formats import gguf as qgguf

gguf = pytest.importorskip("gguf")


def test_q4lab_tensor_round_trips_through_a_gguf_file(tmp_path):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    q0 = q4lab.quantize_4bit(w, quant_type="q4_0")
    q1 = q4lab.quantize_4bit(w[:16], quant_type="q4_1")
    bias = torch.randn(48)
    path = qgguf.write_gguf(tmp_path / "m.gguf", {"w0": q0, "w1": q1, "bias": bias},
                            {"general.architecture": "llama", "general.name": "q4lab test"})
    meta, tensors = qgguf.read_gguf(path)
    assert meta["general.name"] == "q4lab test"
    assert tensors["w0"].quant_type == "q4_0" and tensors["w0"].shape == (48, 96)
    assert np.array_equal(tensors["w0"].data, q0[0].numpy())
    packed, state = tensors["w1"].to_q4lab()
    assert torch.equal(q4lab.dequantize_4bit(torch.from_numpy(packed), state),
                       q4lab.dequantize_4bit(*q1))
    assert np.array_equal(tensors["bias"].data, bias.numpy())

    reader = gguf.GGUFReader(str(path))  # the anchor reads q4lab's file
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["w0"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(np.asarray(by_name["w0"].data).reshape(-1), q0[0].numpy())
    anchor_values = gguf.quants.dequantize(np.asarray(by_name["w0"].data),
                                           gguf.GGMLQuantizationType.Q4_0)
    ours = q4lab.dequantize_4bit(*q0).numpy()
    assert np.array_equal(anchor_values.reshape(ours.shape).view(np.uint32), ours.view(np.uint32))
    assert np.array_equal(np.asarray(by_name["bias"].data), bias.numpy())


def test_gguf_package_file_is_read_and_dequantized(tmp_path):
    rng = np.random.default_rng(2)
    writer = gguf.GGUFWriter(str(tmp_path / "anchor.gguf"), "llama")
    x = rng.standard_normal((8, 512)).astype(np.float32)
    blocks = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("q40", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    raw = {}
    for qt, kind in (("q4_k", gguf.GGMLQuantizationType.Q4_K),
                     ("iq4_nl", gguf.GGMLQuantizationType.IQ4_NL)):
        nbytes = {"q4_k": 144, "iq4_nl": 18}[qt]
        b = rng.integers(0, 256, (4, 2 * nbytes), dtype=np.uint8)
        for k in range(0, b.shape[1], nbytes):
            b[:, k:k + 4] = (rng.standard_normal((4, 2)) * 0.01).astype(np.float16).view(
                np.uint8).reshape(4, 4)
        raw[qt] = (b, kind)
        writer.add_tensor(qt, b, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, tensors = qgguf.read_gguf(tmp_path / "anchor.gguf")
    assert meta["general.architecture"] == "llama"
    packed, state = tensors["q40"].to_q4lab()
    assert state.shape == (8, 512) and np.array_equal(packed, blocks.reshape(-1))
    out = q4lab.dequantize_4bit(torch.from_numpy(packed), state).numpy()
    assert np.array_equal(out.view(np.uint32), gguf.quants.dequantize(
        blocks, gguf.GGMLQuantizationType.Q4_0).view(np.uint32))
    for qt, (b, kind) in raw.items():
        packed, state = tensors[qt].to_q4lab()
        out = q4lab.dequantize_4bit(torch.from_numpy(packed), state).numpy()
        assert np.array_equal(out.view(np.uint32), gguf.quants.dequantize(b, kind).view(np.uint32))


def test_bad_inputs_are_named(tmp_path):
    nf4 = q4lab.quantize_4bit(torch.randn(4, 64))
    with pytest.raises(ValueError, match="no GGUF block type"):
        qgguf.write_gguf(tmp_path / "x.gguf", {"w": nf4})
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a GGUF file"):
        qgguf.read_gguf(tmp_path / "bad.gguf")
