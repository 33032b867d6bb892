"""Sibling 4-bit layers that read the same input run as ONE fused call while decoding (issue 21).

A Llama-style decoder layer multiplies one hidden state by ``q_proj``, ``k_proj`` and ``v_proj``,
and one by ``gate_proj`` and ``up_proj``: seven 4-bit calls per layer become four. Fewer calls
cost less Python and dispatch per token, and a taller stacked weight splits better over threads.

Why the bytes do not change: in the fused matmul's order (pair-chain-v2, q4lab/reference/
matmul.py) every output row is one chain over its own row's bytes and its own absmax, so stacking
the rows of several weights (N1 + N2 + ... rows, same K, blocksize and codebook) into one decode
layout gives every output the same float32 value as the separate calls; a sibling without a bias
adds +0.0, which changes nothing because the row sum is never -0.0 (docs/format.md, "Fused
matmul"); rounding to the output dtype happens once per value either way.
``tests/test_decode_groups.py`` compares the bytes.

How, without touching the model's code: ``link_siblings(model)`` (called by ``quantize_model`` and
``from_pretrained``) gives the siblings one shared ``SiblingGroup``. On a decode call (the fused
path of ``Linear4bit.forward``), the first sibling called computes every sibling's output with one
kernel call and keeps the others' outputs keyed by the input tensor, its identity and version
counter; a sibling called next with that same, unchanged tensor returns its kept output, and a
sibling called with anything else computes its own as usual. The stacked decode layout is built
lazily (at the second call on the same weights, like ``q4lab.matmul.decode_args``), rebuilt when
any sibling's weight is replaced or written in place, counted by ``decode_cache_bytes`` and
dropped by ``drop_decode_cache``; grouping never runs under autograd or ``torch.compile``.
Before compiling a model, ``unlink_siblings(model)`` and decode a token or two eagerly: compiled
code then finds every layer's own decode layout (bench/bench_infer.py ``--compile`` does so).
"""
from __future__ import annotations

import torch

from . import matmul as fused

#: Children of one parent that read the same input in the decoder layers of the transformers
#: models q4lab quantizes (Llama, Mistral, Qwen2, Gemma, SmolLM2: attention and gated MLP).
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_KEY = "_q4lab_siblings"


class SiblingGroup:
    """The layers of one group (in the order of their rows in the stacked weight), their stacked
    decode arguments, and the outputs kept for siblings not yet called."""

    def __init__(self, layers: list):
        self.layers = layers
        self.sizes = [int(m.out_features) for m in layers]
        self.key = None       # (packed, state, version) of every layer the stacked layout is of
        self.seen = None      # the same, at the first call (the layout is built at the second)
        self.args = None      # kernel arguments of the stacked decode layout
        self.kept: dict = {}  # layer -> (x, x._version, y)

    def cache_bytes(self) -> int:
        return 0 if self.args is None else sum(t.numel() * t.element_size()
                                               for t in self.args[:2])

    def drop(self) -> int:
        freed = self.cache_bytes()
        self.key = self.seen = self.args = None
        self.kept.clear()
        return freed

    def _stacked_args(self):
        weights = [m._weight() for m in self.layers]
        key = tuple((p, s, p._version) for p, s in weights)
        same = self.key is not None and all(
            a[0] is b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(self.key, key))
        if same:
            return self.args
        self.args = self.key = None
        if not all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu"
                   for p, _ in weights):
            return None
        if self.seen is None or not all(a[0] is b[0] and a[1] is b[1] and a[2] == b[2]
                                        for a, b in zip(self.seen, key)):
            self.seen = key   # first sight of these weights: no copy yet (FSDP gathers anew)
            return None
        self.args, self.key = fused.repack_rows_stacked(weights), key
        return self.args

    def forward(self, layer, x: torch.Tensor, bias):
        """``layer``'s fused output for ``x`` (compute dtype), or None when the group cannot serve
        this call (the caller then computes it alone)."""
        if (torch.compiler.is_compiling() or torch.is_grad_enabled()
                or not fused.repack_enabled()):
            return None
        kept = self.kept.pop(layer, None)
        if kept is not None and kept[0] is x and kept[1] == x._version:
            return kept[2]
        if not x.is_contiguous() or x.dtype != layer.compute_dtype:
            return None
        if any(m.compute_dtype != x.dtype or (m is not layer and m.uses_fused(x) is False)
               or type(m._parameters["packed"]) not in (torch.Tensor, torch.nn.Parameter)
               for m in self.layers):     # (a sibling sharded alone by FSDP is not gathered)
            return None
        args = self._stacked_args()
        if args is None:
            return None
        biases = [bias if m is layer else m.bias for m in self.layers]
        stacked_bias = None
        if any(b is not None for b in biases):
            stacked_bias = torch.cat([
                torch.zeros(n, dtype=x.dtype) if b is None else b.to(x.dtype)
                for b, n in zip(biases, self.sizes)])
        y = fused.linear_forward(x, None, self.layers[0]._weight()[1], stacked_bias, args)
        outs = y.split(self.sizes, dim=-1)
        if y.numel() != y.shape[-1]:   # several rows: each output contiguous, as a lone call's
            outs = [o.contiguous() for o in outs]
        self.kept = {m: (x, x._version, o) for m, o in zip(self.layers, outs) if m is not layer}
        return outs[self.layers.index(layer)]


def group_of(layer):
    """The ``SiblingGroup`` ``layer`` belongs to, or None."""
    return layer.__dict__.get(_GROUP_KEY)


def link_siblings(model: torch.nn.Module, names=SIBLING_NAMES) -> int:
    """Give every set of sibling ``Linear4bit`` layers named in ``names`` (children of one parent
    with equal in_features, blocksize, codebook, compute dtype and K % blocksize == 0) one
    ``SiblingGroup``; returns the number of groups. Calling it again changes nothing."""
    from .nn import Linear4bit

    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for group_names in names:
            layers = [children.get(n) for n in group_names]
            if not all(isinstance(m, Linear4bit) for m in layers):
                continue
            first = layers[0]._state_template
            if len({id(m) for m in layers}) < len(layers) or not all(
                    m.in_features == layers[0].in_features and m.compute_dtype ==
                    layers[0].compute_dtype and m._state_template.blocksize == first.blocksize
                    and m._state_template.quant_type == first.quant_type
                    and m._state_template.family == "bnb" for m in layers):
                continue
            if layers[0].in_features % int(first.blocksize):
                continue
            if group_of(layers[0]) is not None and group_of(layers[0]).layers == layers:
                continue
            group = SiblingGroup(layers)
            for m in layers:
                m.__dict__[_GROUP_KEY] = group
            count += 1
    return count


def unlink_siblings(model: torch.nn.Module) -> int:
    """Remove every sibling group under ``model`` (each layer computes alone again)."""
    removed = {id(g): g for m in model.modules() if (g := m.__dict__.pop(_GROUP_KEY, None))}
    for g in removed.values():
        g.drop()
    return len(removed)
