"""The quality lab, headless: pure functions of q4lab.quality (perplexity bookkeeping, Pareto
front, configs, layer selection) and widgets.quality_lab driven from Python on the real
SmolLM2-135M (controls set, the scatter's data and the perplexity read back), checked against an
independent computation: the same configuration quantized by ``q4lab.quantize_model`` on a fresh
float copy and evaluated directly gives the same perplexity and bytes.

Cost is kept low by scoring few tokens (64) and generating 2; the 1024-token figures and the QLoRA
ordering are asserted by notebooks/08_quality_lab.ipynb. Source: QLoRA (arXiv 2305.14314) Table 2.
"""
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q4lab
from q4lab import quality as Q

TOKENS = 64


# ---- pure functions ------------------------------------------------------------------------------
def brute_front(points):
    return sorted((i for i, (x, y) in enumerate(points)
                   if not any((a <= x and b <= y and (a, b) != (x, y)) or
                              ((a, b) == (x, y) and j < i)
                              for j, (a, b) in enumerate(points))),
                  key=lambda i: (points[i][0], points[i][1], i))


def test_pareto_front_matches_brute_force():
    rng = random.Random(13)
    for _ in range(200):
        pts = [(rng.choice([4.0, 4.127, 4.25, 4.5, 5.0]), rng.choice([18.0, 18.5, 19.0, 20.8]))
               for _ in range(rng.randint(1, 9))]
        assert Q.pareto_front(pts) == brute_front(pts), pts
    assert Q.pareto_front([(4.5, 19.0), (4.127, 19.1), (4.25, 19.5), (4.0, 22.0)]) == [3, 1, 0]
    with pytest.raises(ValueError, match="finite"):
        Q.pareto_front([(4.0, float("nan"))])


class PositionFreeLM(nn.Module):
    """A causal LM whose logits at position j depend on token j only (an embedding read out by a
    linear layer): context length cannot change any token's score, so a sliding-window perplexity
    must equal the one-pass value exactly when every token is scored once."""

    def __init__(self, vocab=50, max_positions=4096):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(vocab, 16), nn.Linear(16, vocab)
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.calls = []

    def forward(self, input_ids, use_cache=False):
        self.calls.append(input_ids.shape[1])
        return SimpleNamespace(logits=self.out(self.emb(input_ids)))


def test_perplexity_scores_every_token_once():
    model = PositionFreeLM()
    ids = torch.randint(0, 50, (1, 101), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = math.exp(F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item())
    model.calls.clear()
    assert Q.perplexity(model, ids) == pytest.approx(direct, rel=1e-6)
    assert model.calls == [101]
    for window, stride in ((32, 16), (32, 31), (10, 1), (100, 7)):
        model.calls.clear()
        assert Q.perplexity(model, ids, window, stride) == pytest.approx(direct, rel=1e-6)
        assert set(model.calls) == {window}
    model.out.weight.data.zero_()
    model.out.bias.data.zero_()
    assert Q.perplexity(model, ids, 20, 5) == pytest.approx(50.0, rel=1e-6)  # uniform: vocab
    with pytest.raises(ValueError, match="stride"):
        Q.perplexity(model, ids, window=32, stride=32)
    with pytest.raises(ValueError, match="at least 2"):
        Q.perplexity(model, ids[:, :1])


def test_scatter_labels_do_not_collide():
    from q4lab.widgets.quality_lab import label_positions

    assert label_positions([(10.0, 19.0)], ["NF4/64"], (9, 11), (18, 20)) == ["top center"]
    # five points nearly on top of each other (the all-layers cluster): no two labels collide
    pts = [(10.0, 19.3), (10.001, 19.39), (10.3, 19.9), (10.3, 21.6), (9.9, 20.9), (26.5, 15.8)]
    labels = ["NF4/64", "NF4+DQ/64", "INT4/64", "FP4/64", "NF4+DQ/256", "NF4+DQ/64 attn"]
    where = label_positions(pts, labels, (7.5, 29), (13, 27.5), ringed=1)
    assert where[1] is not None and where[-1] is not None
    shown = [p for p in where if p]
    assert len(shown) >= 5
    # crowd 12 points into one spot: some labels must give way (None), never overlap
    assert None in label_positions([(10.0, 19.0)] * 12, ["NF4+DQ/64"] * 12, (0, 30), (0, 40))


def test_labconfig_checks_and_labels():
    assert Q.LabConfig().label == "NF4+DQ/64"
    assert Q.LabConfig("int4", 4096, False, "attention", True, torch.bfloat16).label == \
        "INT4/4096 attn +lm_head bf16"
    for bad, match in (({"blocksize": 48}, "blocksize"), ({"quant_type": "nf3"}, "quant_type"),
                       ({"layers": "heads"}, "layers"), ({"compute_dtype": "int8"}, "compute"),
                       ({"double_quant": "yes"}, "double_quant")):
        with pytest.raises((ValueError, TypeError), match=match):
            Q.LabConfig(**bad)
    assert [c.label for c in Q.PAPER_TABLE] == ["INT4/64", "FP4/64", "NF4/64", "NF4+DQ/64"]


def test_labconfig_takes_every_registry_format():
    from q4lab import quant_types

    for name in quant_types.QUANTIZABLE:
        qt = quant_types.get(name)
        cfg = Q.LabConfig(name)
        assert (cfg.blocksize, cfg.double_quant) == (qt.default_blocksize, qt.family == "bnb")
        assert cfg.family == qt.family and cfg.label.startswith(name.upper())
    assert Q.LabConfig("mxfp4").label == "MXFP4/32" and Q.LabConfig("q4_1").label == "Q4_1/32"
    for bad, match in (({"quant_type": "q4_k"}, "no quantizer"),
                       ({"quant_type": "nvfp4", "blocksize": 32}, "fixed block of 16"),
                       ({"quant_type": "mxfp4", "double_quant": True}, "no double quant"),
                       ({"quant_type": "q4_0", "compute_dtype": "bfloat16"}, "round trip")):
        with pytest.raises(ValueError, match=match):
            Q.LabConfig(**bad)


def test_the_lab_reads_the_registry():
    """The codebook buttons and the landscape rows come from q4lab.quant_types: a format added
    there (here a copy of NF4 under another name) appears in both; dequantize-only ones do not."""
    from dataclasses import replace

    from q4lab import landscape, quant_types
    from q4lab.widgets.quality_lab import codebooks

    assert [q for _, q in codebooks()] == list(quant_types.QUANTIZABLE)
    assert "q4_k" not in [q for _, q in codebooks()] and len(codebooks()) >= 7
    registry = {**quant_types.REGISTRY, "nf4x": replace(quant_types.REGISTRY["nf4"], name="nf4x")}
    assert codebooks(registry)[-1] == ("NF4X", "nf4x")
    specs = [s.label for s in landscape.registry_specs(quant_types.REGISTRY)]
    assert specs == [s.label for s in landscape.LANDSCAPE]
    assert {s.split("/")[0].split("+")[0].lower() for s in specs} == set(quant_types.QUANTIZABLE)
    assert {"NF4+DQ/64", "NF4/256", "NVFP4/16", "Q4_0/32", "MXFP4/32"} <= set(specs)


def test_agreement_by_hand():
    """KL, top-1 and perplexity from log-probabilities, against torch's own kl_div and
    cross_entropy on random logits (4 positions, 7 tokens)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g) * 2
    ids = torch.tensor([[5, 1, 0, 6, 2]])
    pa, pb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    got = Q.agreement(pa, pb, ids)
    kl = F.kl_div(pb, pa, log_target=True, reduction="batchmean").item()
    assert got["kl"] == pytest.approx(kl, rel=1e-6) and got["kl"] > 0
    assert got["top1"] == (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert got["perplexity"] == pytest.approx(math.exp(F.cross_entropy(b, ids[0, 1:]).item()))
    assert Q.agreement(pa, pa, ids) == {"kl": 0.0, "top1": 1.0,
                                        "perplexity": pytest.approx(math.exp(
                                            F.cross_entropy(a, ids[0, 1:]).item()))}
    with pytest.raises(ValueError, match="do not match"):
        Q.agreement(pa, pb[:3], ids)


def test_default_text_is_the_apache_licence():
    text = Q.default_text()
    assert text.startswith("Apache License") and "Version 2.0, January 2004" in text[:200]
    assert len(text) > 8000


# ---- on SmolLM2 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    pytest.importorskip("transformers")
    from q4lab import models, widgets

    if models.available()["smollm2"] is not True:
        pytest.skip(f"SmolLM2: {models.available()['smollm2']}")
    return widgets.quality_lab(tokens=TOKENS, new_tokens=2)


def scatter_points(fig) -> dict:
    """{label: (x, y)} of every history point in the scatter (the codebook traces)."""
    from q4lab.widgets.quality_lab import trace_name

    names = {trace_name(q) for q in q4lab.quant_types.QUANTIZABLE}
    out = {}
    for t in fig.data:
        if t.name in names:
            out.update({lab: (x, y) for lab, x, y in zip(t.text, t.x, t.y)})
    return out


@pytest.mark.slow
def test_smollm2_layer_groups(lab):
    rows = Q.linear_layers(lab.model)
    groups = [r["group"] for r in rows]
    assert groups.count("attention") == 4 * 30 and groups.count("mlp") == 3 * 30
    assert [r["name"] for r in rows if r["group"] == "lm_head"] == ["lm_head"]
    assert {r["kind"] for r in rows if r["depth"] == 7} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.slow
def test_layer_selection_and_restore(lab):
    before = {n: id(m) for n, m in lab.model.named_modules()}
    for layers, lm_head, expect in (("attention", True, {"attention", "lm_head"}),
                                    ("mlp", False, {"mlp"})):
        with Q.quantized(lab.model, Q.LabConfig(layers=layers, lm_head=lm_head)) as m:
            four = {n for n, x in m.named_modules() if isinstance(x, q4lab.Linear4bit)}
        rows = Q.linear_layers(lab.model)  # float again (raises if a Linear4bit were left)
        assert four == {r["name"] for r in rows if r["group"] in expect}
    assert {n: id(m) for n, m in lab.model.named_modules()} == before


@pytest.mark.slow
def test_controls_drive_the_scatter(lab):
    n0 = len(lab.history)
    first = lab.current
    assert first["label"] == "NF4+DQ/64" and lab.perplexity == first["perplexity"]
    lab.quant_type.value = "fp4"
    lab.double_quant.value = False
    assert [r["label"] for r in lab.history[n0:]] == ["FP4+DQ/64", "FP4/64"]
    cur = lab.current
    assert cur["label"] == "FP4/64" and lab.config == Q.LabConfig("fp4", 64, False)
    pts = scatter_points(lab.fig)
    assert len(pts) == len(lab.history)
    assert pts["FP4/64"] == (cur["model_bits_per_param"], cur["perplexity"])
    ring = next(t for t in lab.fig.data if t.name == "current")
    assert (ring.x[0], ring.y[0]) == pts["FP4/64"]
    ref = next(t for t in lab.fig.data if t.name.startswith("float32 model"))
    assert set(ref.y) == {lab.float_record["perplexity"]}
    assert f"{cur['perplexity']:.3f}" in lab.readout.value
    assert cur["bits_per_param"] == 4.5 and cur["layers"] == 210
    # revisiting a configuration re-draws its point, it does not add one
    lab.set(quant_type="nf4", double_quant=True)
    assert len(lab.history) == n0 + 2 and lab.current is first
    # the synced widget state holds the figure as it is now (survives a page reload)
    shown = lab.fig.view.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert [d["name"] for d in shown["data"]] == [t.name for t in lab.fig.data]
    assert shown["layout"]["title"]["text"] == lab.fig.layout.title.text


@pytest.mark.slow
def test_lab_matches_quantize_model_on_a_fresh_copy(lab):
    """The independent computation of the issue: quantize_model on a fresh float SmolLM2, one
    forward pass, cross-entropy by hand; same perplexity, same stored bytes."""
    from q4lab import models

    rec = lab.set(quant_type="fp4", blocksize=128, double_quant=False, layers="all",
                  lm_head=False, compute_dtype="float32")
    fresh, _ = models.load_smollm2()
    q4lab.quantize_model(fresh, q4lab.Q4Config(quant_type="fp4", blocksize=128,
                                               double_quant=False, compute_dtype=torch.float32,
                                               skip_modules=("lm_head",)), progress=False)
    four = [m for m in fresh.modules() if isinstance(m, q4lab.Linear4bit)]
    ids = lab.ids
    with torch.no_grad():
        logits = fresh(ids).logits[0, :-1].float()
    ppl = math.exp(F.cross_entropy(logits, ids[0, 1:]).item())
    assert rec["perplexity"] == pytest.approx(ppl, rel=1e-6)
    stored = sum(sum(q4lab.storage_bytes(m.quant_state).values()) for m in four)
    numel = sum(m.quant_state.numel for m in four)
    assert (rec["layers"], rec["stored_bytes"], rec["quantized_params"]) == (len(four), stored,
                                                                            numel)
    assert rec["bits_per_param"] == 8 * stored / numel
    # model bytes: the float model's, minus the float32 weights replaced, plus the stored bytes
    assert rec["model_bytes"] == lab.float_record["model_bytes"] - 4 * numel + stored
    # the lab's float copy is untouched by all the requantizing
    again, _ = models.load_smollm2()
    mine = lab.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in again.state_dict().items())


@pytest.mark.slow
def test_paper_table_button(lab):
    lab.paper_button.click()
    labels = [r["label"] for r in lab.history]
    assert {"INT4/64", "FP4/64", "NF4/64", "NF4+DQ/64"} <= set(labels)
    assert lab.table.value.count("<tr>") == 1 + 5  # header, float model, four formats
    pts = [(r["model_bits_per_param"], r["perplexity"]) for r in lab.history]
    front = next(t for t in lab.fig.data if t.name == "Pareto front")
    assert list(zip(front.x, front.y)) == [pts[i] for i in brute_front(pts)]


@pytest.mark.slow
def test_sensitivity_heatmap_is_computed_once(lab):
    lab.set(quant_type="int4", blocksize=256, double_quant=True)
    kinds, depths = ["self_attn.v_proj", "mlp.down_proj"], [0, 29]
    s = lab.compute_sensitivity(kinds, depths, tokens=32, progress=False)
    assert s.computed == 4 and (s.kinds, s.depths) == (kinds, depths)
    again = lab.compute_sensitivity(kinds, depths, tokens=32, progress=False)
    assert again.computed == 0 and again.delta == s.delta
    # reusing the float outputs of the blocks before a cell's depth changes no bit
    full = Q.sensitivity(lab.model, lab.ids[:, :32], lab.config, kinds, depths, progress=False,
                         reuse_prefix=False)
    assert full.delta == s.delta and full.base == s.base
    heat = lab.sensitivity_fig.data[0]
    assert [list(r) for r in heat.z] == s.delta and list(heat.y) == kinds
    lo, hi = min(min(r) for r in s.delta), max(max(r) for r in s.delta)
    assert f"{lo:+.3f} to {hi:+.3f}" in heat.colorbar.title.text
    # one cell by hand: that layer alone, quantized by quantize_model, perplexity minus float's
    ids = lab.ids[:, :32]
    with Q.quantized(lab.model, lab.config, names=["model.layers.29.mlp.down_proj"]) as m:
        assert sum(isinstance(x, q4lab.Linear4bit) for x in m.modules()) == 1
        with torch.no_grad():
            q = math.exp(F.cross_entropy(m(ids).logits[0, :-1].float(), ids[0, 1:]).item())
    with torch.no_grad():
        f = math.exp(F.cross_entropy(lab.model(ids).logits[0, :-1].float(), ids[0, 1:]).item())
    assert s.delta[1][1] == pytest.approx(q - f, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_bad_input_is_refused(lab):
    from q4lab import widgets

    cfg = lab.config
    with pytest.raises(ValueError, match="blocksize"):
        lab.set(blocksize=48)
    with pytest.raises(TypeError, match="unknown controls"):
        lab.set(codebook="nf4")
    assert lab.config == cfg
    assert lab.set(compute_dtype=torch.bfloat16)["label"].endswith(" bf16")  # a torch dtype works
    assert lab.compute_dtype.value == "bfloat16"
    with pytest.raises(ValueError, match="both model and tokenizer"):
        widgets.quality_lab(model=lab.model)
    with pytest.raises(ValueError, match="at least 2"):
        Q.text_tokens(lab.tokenizer, "Hi", tokens=64)
    with Q.quantized(lab.model, Q.LabConfig()) as m:
        with pytest.raises(ValueError, match="already 4-bit"):
            Q.linear_layers(m)


@pytest.mark.slow
def test_a_fixed_block_format_from_the_buttons(lab):
    """Clicking MXFP4 moves the blocksize slider to its one block and turns double quant off;
    clicking NF4 again brings NF4's own settings back (a cached point, not a new one)."""
    lab.set(quant_type="nf4", blocksize=64, double_quant=True, layers="all", lm_head=False,
            compute_dtype="float32")
    n0 = len(lab.history)
    lab.quant_type.value = "mxfp4"
    assert lab.config == Q.LabConfig("mxfp4") and lab.current["label"] == "MXFP4/32"
    assert tuple(lab.blocksize.options) == (32,) and lab.blocksize.disabled
    assert lab.double_quant.value is False and lab.double_quant.disabled
    assert lab.compute_dtype.disabled
    assert 0 < lab.current["kl"] and 0 < lab.current["top1"] <= 1
    assert "MXFP4" in {t.name for t in lab.fig.data}
    lab.quant_type.value = "nf4"
    assert lab.config == Q.LabConfig() and not lab.blocksize.disabled
    assert len(lab.history) == n0 + 1  # MXFP4/32 is new, NF4+DQ/64 was cached
    with pytest.raises(ValueError, match="no double quant"):
        lab.set(quant_type="q4_0", double_quant=True)
    assert lab.config == Q.LabConfig()


@pytest.mark.slow
def test_a_round_tripped_format_matches_an_independent_computation(lab):
    """NVFP4 on the attention layers and the tied lm_head: a fresh float copy whose weights are
    set by hand to their q4lab round trip, one forward pass, KL / top-1 / perplexity by torch's
    own functions, bytes from the states; the lab's embedding stays float (lm_head is tied)."""
    from q4lab import models

    rec = lab.set(quant_type="nvfp4", layers="attention", lm_head=True)
    fresh, _ = models.load_smollm2()
    chosen = [r["name"] for r in Q.linear_layers(fresh)
              if r["group"] in ("attention", "lm_head")]
    stored, numel = 0, 0
    with torch.no_grad():
        ref_logits = fresh(lab.ids).logits[0, :-1].float()
        fresh.lm_head.weight = nn.Parameter(fresh.lm_head.weight.detach().clone())  # untie
        for name in chosen:
            layer = fresh.get_submodule(name)
            packed, state = q4lab.quantize_4bit(layer.weight.detach(), None, "nvfp4")
            layer.weight.copy_(q4lab.dequantize_4bit(packed, state, torch.float32))
            stored += sum(q4lab.storage_bytes(state).values())
            numel += layer.weight.numel()
        logits = fresh(lab.ids).logits[0, :-1].float()
    lp, lq = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="batchmean").item()
    assert rec["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7) and rec["kl"] > 0
    assert rec["top1"] == (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    ppl = math.exp(F.cross_entropy(logits, lab.ids[0, 1:]).item())
    assert rec["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert (rec["layers"], rec["stored_bytes"], rec["quantized_params"]) == (len(chosen), stored,
                                                                            numel)
    # the tied embedding stays float: only the untied attention weights leave the model
    head = fresh.lm_head.weight.numel()
    assert rec["model_bytes"] == lab.float_record["model_bytes"] - 4 * (numel - head) + stored
    assert torch.equal(lab.model.lm_head.weight, lab.model.model.embed_tokens.weight)
    again, _ = models.load_smollm2()
    assert torch.equal(lab.model.model.embed_tokens.weight, again.model.embed_tokens.weight)


@pytest.mark.slow
def test_every_format_button(lab):
    """"every format": one row per registry format (and the equal-bits partners) in one table
    and one bits-vs-perplexity plot, KL and top-1 for each, and the layer kinds ranked."""
    from q4lab import landscape, quant_types

    lab.set(quant_type="nf4", blocksize=64, double_quant=True, layers="all", lm_head=False)
    lab.landscape_button.click()
    expected = [s.label for s in landscape.registry_specs()]
    rows = lab.landscape_rows
    assert [r["label"] for r in rows[1:]] == expected and rows[0] is lab.float_record
    by = {r["label"]: r for r in rows}
    assert {r["quant_type"] for r in (x["config"] for x in rows[1:])} == \
        set(quant_types.QUANTIZABLE)
    assert by["Q4_1/32"]["kl"] == 0.0 and by["Q4_1/32"]["top1"] == 1.0  # SmolLM2 is Q4_1
    assert all(r["kl"] > 0 and 0 < r["top1"] <= 1 for r in rows[1:] if r["label"] != "Q4_1/32")
    assert abs(by["NF4+DQ/64"]["bits_per_param"] - by["NF4/256"]["bits_per_param"]) < 0.01
    assert by["MXFP4/32"]["bits_per_param"] == 4.25 and by["Q4_0/32"]["bits_per_param"] == 4.5
    table = lab.table.value
    assert table.count("<tr>") == 2 + len(expected) and "KL (nats)" in table
    assert all(f"<td>{label}</td>" in table for label in expected)
    plotted = [lbl for t in lab.landscape_fig.data if t.mode == "markers+text" for lbl in t.text]
    assert sorted(plotted) == sorted(expected)
    pairs = [t.name for t in lab.landscape_fig.data if t.name.startswith("equal bits")]
    assert "equal bits: NF4+DQ/64 vs NF4/256" in pairs
    kinds = lab.kind_sensitivity
    assert len(kinds) == 7 and sum(k["layers"] for k in kinds) == 210
    assert [k["kl"] for k in kinds] == sorted((k["kl"] for k in kinds), reverse=True)
    assert kinds[0]["kind"] in lab.kinds_table.value
