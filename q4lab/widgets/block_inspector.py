"""``block_inspector(weights)``: one block of a real layer through every step of the 4-bit format,
with the exact float32 arithmetic of each step and the bytes the reference stores.

Source: QLoRA (arXiv 2305.14314) §2 "Block-wise k-bit Quantization" and §3 "Double Quantization";
storage as bitsandbytes ``kernels.cu::kQuantizeBlockwise`` (high nibble first). The numbers come
from ``q4lab.reference`` (``quantize_4bit`` on the whole layer, then ``blockwise`` step functions on
the chosen block), so the bytes shown ARE the reference's bytes (tested).
"""
from __future__ import annotations

import numpy as np

from .. import reference as ref
from ..constants import BLOCKSIZES, NESTED_BLOCKSIZE
from ..reference import blockwise as bw
from ._common import (F32, QUANT_TYPES, WidgetBase, f32_hex, hint, html_table, linear_weights,
                      new_figure, redraw)

SHOW_ROWS = 16


def inspect_block(x: np.ndarray, block: int, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, _cache: dict | None = None) -> dict:
    """Every intermediate of block ``block`` of ``x`` (flattened row-major), from the reference.

    Keys: values, absmax (exact float32), absmax_used (decoded from the nested code when
    double-quantized, else the same), absmax_code (uint8 or None), reciprocal, scaled, codes,
    packed (this block's bytes of the reference's packed output), table, dequantized."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    nblocks = -(-flat.size // blocksize)
    if not 0 <= block < nblocks:
        raise ValueError(f"block={block} is out of range: {flat.size} values at blocksize "
                         f"{blocksize} make {nblocks} blocks (0..{nblocks - 1})")
    key = (blocksize, quant_type, double_quant)
    if _cache is not None and key in _cache:
        packed, state, x_hat = _cache[key]
    else:
        packed, state = ref.quantize_4bit(flat, blocksize, quant_type, double_quant)
        x_hat = ref.dequantize_4bit(packed, state, "float32")
        if _cache is not None:
            _cache[key] = packed, state, x_hat
    lo, hi = block * blocksize, min(flat.size, (block + 1) * blocksize)
    values = flat[lo:hi]
    blocks = bw.split_blocks(values, blocksize)
    absmax = bw.block_absmax(blocks)
    prescale, recip = bw.reciprocal_scale(absmax)
    scaled = bw.scale_blocks(blocks, prescale, recip)[0, : hi - lo]
    block_bytes = packed[lo // 2: (hi + 1) // 2]
    return {"values": values, "absmax": absmax[0], "prescale": prescale[0], "reciprocal": recip[0],
            "absmax_used": ref.state_absmax(state)[block],
            "absmax_code": state.absmax[block] if state.nested else None,
            "offset": state.offset_value if state.nested else None,
            "absmax2": state.state2.absmax[block // NESTED_BLOCKSIZE] if state.nested else None,
            "scaled": scaled, "codes": bw.unpack_nibbles(block_bytes, hi - lo),
            "packed": block_bytes, "table": ref.codebook(quant_type),
            "dequantized": x_hat.reshape(-1)[lo:hi], "state": state}


def arithmetic_rows(info: dict, rows: int = SHOW_ROWS) -> list[tuple]:
    """Per element: x, xn = RN(x * r), code, table[code], out = RN(table[code] * absmax_used)."""
    out = []
    for i in range(min(rows, info["values"].size)):
        x, xn, c = info["values"][i], info["scaled"][i], int(info["codes"][i])
        out.append((i, f"{x:+.8e}", f"{xn:+.8f}", f"{c:2d} = {c:04b}", f"{info['table'][c]:+.7f}",
                    f"{info['dequantized'][i]:+.8e}"))
    return out


class BlockInspector(WidgetBase):
    """Drive it from Python: set ``layer.value``, ``block.value``, ``quant_type.value``,
    ``blocksize.value``, ``double_quant.value``; read ``info`` (the dict of
    :func:`inspect_block`) and ``fig.data``."""

    def __init__(self, weights, blocksize: int = 64, quant_type: str = "nf4",
                 double_quant: bool = True):
        import ipywidgets as W

        self.weights = linear_weights(weights)
        self._caches: dict = {}
        names = list(self.weights)
        self.layer = W.Dropdown(options=names, value=names[0], description="layer")
        self.quant_type = W.ToggleButtons(options=QUANT_TYPES, value=quant_type, description="type")
        self.blocksize = W.Dropdown(options=BLOCKSIZES, value=blocksize, description="blocksize")
        self.double_quant = W.Checkbox(value=double_quant, description="double quant")
        self.block = W.IntSlider(value=0, min=0, max=0, description="block",
                                 continuous_update=False)
        self.text = W.HTML()
        self.fig = new_figure(xaxis_title="element in block", yaxis_title="value", height=360)
        for w in (self.layer, self.quant_type, self.blocksize, self.double_quant, self.block):
            w.observe(lambda _c: self.update(), names="value")
        self.widget = W.VBox([
            W.HBox([self.layer, self.blocksize]), W.HBox([self.quant_type, self.double_quant]),
            self.block, self.fig.view,
            hint("<b>Try this:</b> switch the type between nf4, fp4 and int4, then step the block "
                 "slider. <b>Look for:</b> every dequantized × sits on a grey line "
                 "(level × absmax); the block's largest |value| lands on the outermost line, "
                 "±1 × absmax."),
            self.text])
        self.update()

    def update(self) -> None:
        """Recompute the chosen block and redraw (one batched, re-synced figure update)."""
        x = self.weights[self.layer.value]
        nblocks = -(-x.size // self.blocksize.value)
        if self.block.max != nblocks - 1:
            with self.block.hold_trait_notifications():
                self.block.max = nblocks - 1
        cache = self._caches.setdefault(self.layer.value, {})
        self.info = inspect_block(x, self.block.value, self.blocksize.value,
                                  self.quant_type.value, self.double_quant.value, cache)
        self._draw()
        self.text.value = self._html()

    def _draw(self) -> None:
        import plotly.graph_objects as go

        info = self.info
        idx = np.arange(info["values"].size)
        grid = info["table"].astype(np.float64) * float(info["absmax_used"])
        traces = [go.Scatter(x=idx, y=info["values"], mode="markers", name="original"),
                  go.Scatter(x=idx, y=info["dequantized"], mode="markers", name="dequantized",
                             marker=dict(symbol="x")),
                  go.Scatter(x=np.tile([idx[0] - 0.5, idx[-1] + 0.5, None], grid.size),
                             y=np.repeat(grid, 3), mode="lines", name="levels × absmax",
                             line=dict(color="rgba(0,0,0,0.15)"), hoverinfo="skip")]
        redraw(self.fig, traces,
               (f"{self.layer.value}: block {self.block.value} "
                f"({self.quant_type.value}, blocksize "
                f"{self.blocksize.value})"))

    def _html(self) -> str:
        i = self.info
        steps = [("absmax = max|x|", f"{i['absmax']:.8e}", f"0x{f32_hex(i['absmax'])}"),
                 ("r = RN(1 / absmax)" + (" (after ×2^±24 prescale)" if i["prescale"] != 1 else ""),
                  f"{i['reciprocal']:.8e}", f"0x{f32_hex(i['reciprocal'])}")]
        if i["absmax_code"] is not None:
            steps += [("offset (exact mean of all absmax)", f"{i['offset']:.8e}",
                       f"0x{f32_hex(i['offset'])}"),
                      (f"absmax2 of this group of {NESTED_BLOCKSIZE} blocks", f"{i['absmax2']:.8e}",
                       f"0x{f32_hex(i['absmax2'])}"),
                      ("8-bit absmax code", f"{int(i['absmax_code'])}",
                       f"0x{int(i['absmax_code']):02x}"),
                      ("absmax used = RN(RN(dyn[q] × absmax2) + offset)",
                       f"{i['absmax_used']:.8e}", f"0x{f32_hex(i['absmax_used'])}")]
        head = html_table(steps, ("step", "value", "float32 bits"), "Block scale")
        rows = html_table(arithmetic_rows(i), ("i", "x", "xn = RN(x·r)", "code",
                                               "table[code]", "out = RN(table·absmax)"),
                          f"First {min(SHOW_ROWS, i['values'].size)} of {i['values'].size} "
                          f"elements")
        hexes = " ".join(f"{b:02x}" for b in i["packed"])
        return (head + rows + "<p><b>Packed bytes of this block</b> (element 2j in the high "
                f"nibble):</p><pre style='white-space:pre-wrap'>{hexes}</pre>")


def block_inspector(weight_or_dict_of_weights, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True) -> BlockInspector:
    """Inspect blocks of a weight (tensor or ndarray), a dict of weights, or a model's Linears."""
    return BlockInspector(weight_or_dict_of_weights, blocksize, quant_type, double_quant)
