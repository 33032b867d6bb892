"""q4lab.widgets: interactive figures for 4-bit quantization (ipywidgets controls driving plotly
figures shown through an ``ipywidgets.Output``, see ``_common.LiveFigure``), each a small class
whose controls can be set from Python and whose figure data can be read back, so every widget is
tested headless (bqplot's habit) and in a real browser.

- ``codebook_explorer()``: NF4 / FP4 / INT4 levels over N(0, 1), NF4 derived from the quantiles
  (QLoRA §3, bnb ``create_normal_map``).
- ``block_inspector(weights)``: one block through absmax -> scale -> encode -> pack -> dequant,
  with the reference's bytes (QLoRA §2, bnb ``kQuantizeBlockwise``).
- ``error_histograms(model_or_tensor_or_dict)``: quantization error per layer, NF4 / FP4 / INT4,
  blocksize 32-4096, MSE and SQNR.
- ``memory_calculator()``: the whole model on a GPU (4-bit linear layers, 16-bit embeddings,
  lm_head and norms, KV cache, runtime) and bits/param 4.5 vs 4.127 (QLoRA §3 "Double
  Quantization").
- ``model_dashboard(model)``: every layer's error and bytes as a heatmap and a table.
- ``compute_dtype_explorer(weights)``: float32 / float16 / bfloat16 compute of a 4-bit layer.
- ``quality_lab(model=None, tokenizer=None, text=None)``: requantize a real LLM per format and
  watch perplexity, bytes and output move (QLoRA Table 2, per-layer sensitivity).
- ``normal_premise(weights)``: scaled weights against NF4's normal premise, and code usage.
- ``blockwise_tradeoff``: one scale per tensor vs per block; SQNR vs bits/param per blocksize.
- ``new_figure`` / ``redraw``: the widgets' look and their one update path, for notebooks' own
  figures (a ``LiveFigure``: every change re-synced into its view, so it survives a page reload).
"""
from .block_inspector import BlockInspector, block_inspector
from .compute_dtype import ComputeDtypeExplorer, compute_dtype_explorer
from .codebook_explorer import CodebookExplorer, codebook_explorer, nf4_derivation
from .error_histograms import ErrorHistograms, error_histograms
from .memory_calculator import ARCHITECTURES, MemoryCalculator, memory_calculator, model_memory
from .model_dashboard import ModelDashboard, layer_table, model_dashboard
from .quality_lab import QualityLab, quality_lab
from .normal_premise import NormalPremise, code_usage, entropy_bits, normal_premise
from . import blockwise_tradeoff
from ._common import log_ticks, new_figure, redraw

__all__ = ["codebook_explorer", "block_inspector", "error_histograms", "memory_calculator",
           "model_dashboard", "compute_dtype_explorer", "ComputeDtypeExplorer", "CodebookExplorer",
           "BlockInspector", "ErrorHistograms",
           "MemoryCalculator", "ModelDashboard", "nf4_derivation", "ARCHITECTURES", "model_memory",
           "layer_table", "normal_premise", "NormalPremise", "code_usage", "entropy_bits",
           "blockwise_tradeoff", "new_figure", "redraw", "log_ticks", "quality_lab", "QualityLab"]
