"""q4lab.quality: what a 4-bit format does to a real causal LM, as plain functions (no widgets).

One float model is kept; :func:`quantized` requantizes it in place for one :class:`LabConfig`
and puts every original layer back on exit, so each configuration starts from the same float
weights. Every format of ``q4lab.quant_types`` with a quantizer can be chosen: NF4 / FP4 / INT4
become ``q4lab.Linear4bit`` (``q4lab.quantize_model``, the native kernel); MXFP4, NVFP4, Q4_0
and Q4_1 replace each weight by its float32 round trip (``q4lab.round_trip.round_tripped``).

- :func:`perplexity`: exp(mean negative log-likelihood) of a token sequence, every token after the
  first scored once. Method: ONE forward pass when the sequence fits the window (default: the
  model's ``max_position_embeddings``, 8192 for SmolLM2, so the lab's 1024 tokens take one pass);
  longer sequences slide the window of the transformers guide "Perplexity of fixed-length models"
  (end moved by ``stride``, each window scoring only the tokens the previous one did not). Logits
  are cast to float32 before the log-softmax; the sum is accumulated in float64.
- :func:`log_probs` / :func:`agreement`: next-token log-probabilities from one forward pass, and
  against the source model's: KL divergence, top-1 agreement, perplexity.
- :func:`evaluate`: perplexity (and KL / top-1 given the source's log-probabilities), bits/param
  and bytes from the stored bytes (``q4lab.report``, which
  sums ``q4lab.storage_bytes``: packed codes + absmax + nested absmax + offset), a short greedy
  continuation and timings, for one configuration or the float model.
- :func:`sensitivity`: perplexity change when ONE layer (a layer kind at one depth) is quantized
  alone, with a progress bar, cached in a dict the caller keeps.
- :func:`pareto_front`: the (bits/param, perplexity) points no other point beats on both.

Sources: QLoRA (Dettmers et al. 2023, arXiv 2305.14314) §3 and Table 2 (NF4 vs FP4 vs Int4 at
blocksize 64; double quantization, 0.373 bits/param saved at no cost in quality); bits per
parameter from the stored bytes: ``docs/format.md`` §11; the widget built on this:
``docs/architecture.md`` §4.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_types
from .reference import BLOCKSIZES

LAYER_CHOICES = ("attention", "mlp", "all")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PROMPT = "The capital of France is"

_ATTENTION_PARTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn"}
_ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "out_proj",
                    "qkv_proj", "c_attn"}
_MLP_PARTS = {"mlp", "feed_forward", "ffn", "intermediate", "block_sparse_moe"}
_MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3"}


@dataclass(frozen=True)
class LabConfig:
    """One choice in the quality lab: the 4-bit format (``quant_type``: any format of
    ``q4lab.quant_types`` with a quantizer; ``blocksize`` None = the format's own, 32-4096 for
    nf4 / fp4 / int4; ``double_quant`` None = on for those three, which alone have it), which
    layers (``layers`` attention / mlp / all, and ``lm_head`` on or off) and the
    ``compute_dtype`` of the 4-bit layers (nf4 / fp4 / int4 run as ``q4lab.Linear4bit``; the
    other formats by float32 weight round trip, so float32 only). Hashable: the lab caches
    results by config."""

    quant_type: str = "nf4"
    blocksize: int | None = None
    double_quant: bool | None = None
    layers: str = "all"
    lm_head: bool = False
    compute_dtype: str = "float32"

    def __post_init__(self):
        qt = quant_types.get(self.quant_type)
        if not qt.can_quantize:
            raise ValueError(f"quant_type={self.quant_type!r} has no quantizer in q4lab "
                             f"(dequantize only); use one of {quant_types.QUANTIZABLE}")
        object.__setattr__(self, "blocksize", qt.check_blocksize(self.blocksize))
        if self.double_quant is None:
            object.__setattr__(self, "double_quant", qt.family == "bnb")
        for field in ("double_quant", "lm_head"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be True or False, got {getattr(self, field)!r}")
        if self.double_quant and qt.family != "bnb":
            raise ValueError(f"quant_type={self.quant_type!r} has no double quantization "
                             f"({qt.block_scale}); pass double_quant=False or leave it unset")
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"layers={self.layers!r} is unknown; use one of {LAYER_CHOICES}")
        dtype = self.compute_dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of "
                             f"{COMPUTE_DTYPES}")
        if dtype != "float32" and qt.family != "bnb":
            raise ValueError(f"compute_dtype={dtype!r}: {self.quant_type} is measured by float32 "
                             f"weight round trip (q4lab.Linear4bit runs nf4 / fp4 / int4 only); "
                             f"use compute_dtype='float32'")
        object.__setattr__(self, "compute_dtype", dtype)

    @property
    def family(self) -> str:
        """The format's family in ``q4lab.quant_types``: "bnb", "mx" or "gguf"."""
        return quant_types.family(self.quant_type)

    @property
    def label(self) -> str:
        """Short name for a plot: ``NF4+DQ/64``, then `` attn`` / `` MLP``, `` +lm_head``,
        `` bf16`` where they differ from the defaults."""
        s = f"{self.quant_type.upper()}{'+DQ' if self.double_quant else ''}/{self.blocksize}"
        s += {"attention": " attn", "mlp": " MLP", "all": ""}[self.layers]
        s += " +lm_head" if self.lm_head else ""
        s += "" if self.compute_dtype == "float32" else f" {DTYPE_SHORT[self.compute_dtype]}"
        return s

    def replace(self, **changes) -> LabConfig:
        return LabConfig(**{**asdict(self), **changes})


#: The data-type comparison of QLoRA Table 2 (Int4, FP4, NF4, NF4 + double quant), blocksize 64,
#: every linear layer but lm_head, float32 compute.
PAPER_TABLE = (LabConfig("int4", 64, False), LabConfig("fp4", 64, False),
               LabConfig("nf4", 64, False), LabConfig("nf4", 64, True))


# ---- the model's linear layers ------------------------------------------------------------------
def linear_layers(model: nn.Module) -> list[dict]:
    """One row per ``nn.Linear`` (every name of a shared one): ``name``, ``group`` ("attention",
    "mlp", "lm_head" or "other"), ``depth`` (the first integer in the name: the transformer block,
    or None), ``kind`` (the name after the depth, e.g. ``self_attn.q_proj``) and ``params``.
    The model must be float: a ``q4lab.Linear4bit`` in it is an error."""
    from . import Linear4bit
    from .quantize import linear_layers as linear_layers_of

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    already = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if already:
        raise ValueError(f"the quality lab needs a float model, but {len(already)} layers are "
                         f"already 4-bit (first: {already[0]!r}); pass the unquantized model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = []
    for name, m in linear_layers_of(model).items():  # every name of a shared layer
        if not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        match = re.search(r"(?:^|\.)(\d+)\.", name)
        depth = int(match.group(1)) if match else None
        kind = name[match.end():] if match else name
        if parts[-1] == "lm_head" or (head is not None and m is head):
            group = "lm_head"
        elif set(parts[:-1]) & _ATTENTION_PARTS or parts[-1] in _ATTENTION_NAMES:
            group = "attention"
        elif set(parts[:-1]) & _MLP_PARTS or parts[-1] in _MLP_NAMES:
            group = "mlp"
        else:
            group = "other"
        rows.append({"name": name, "group": group, "depth": depth, "kind": kind,
                     "params": m.weight.numel()})
    if not rows:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    return rows


def select_layers(rows: list[dict], layers: str = "all", lm_head: bool = False) -> list[str]:
    """Names of the layers a config quantizes: ``attention`` or ``mlp`` layers, or ``all`` (every
    linear layer but lm_head), plus lm_head when ``lm_head`` is True."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers={layers!r} is unknown; use one of {LAYER_CHOICES}")
    chosen = [r["name"] for r in rows if r["group"] != "lm_head"
              and (layers == "all" or r["group"] == layers)]
    if lm_head:
        chosen += [r["name"] for r in rows if r["group"] == "lm_head"]
    return chosen


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each distinct tensor once (a tied lm_head is not counted twice)."""
    from .nn import storage_parameter_ids

    seen, total = storage_parameter_ids(model), 0  # 4-bit bytes are not float parameters
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@contextmanager
def quantized(model: nn.Module, cfg: LabConfig, names=None):
    """``with quantized(model, cfg) as m:`` -- ``model`` with the layers ``cfg`` selects (or
    exactly ``names``) in ``cfg``'s format; on exit, even after an error, every original layer
    and weight is put back, so ``model`` is the same float model again. nf4 / fp4 / int4:
    the layers become ``q4lab.Linear4bit`` through ``q4lab.quantize_model`` (native kernel, no
    progress bar); the other formats (MXFP4, NVFP4, Q4_0, Q4_1, which Linear4bit does not run):
    each weight is replaced by its float32 round trip (``q4lab.round_trip.round_tripped``)."""
    with _quantized(model, cfg, names) as (m, _info):
        yield m


@contextmanager
def _quantized(model: nn.Module, cfg: LabConfig, names=None):
    """:func:`quantized` yielding ``(model, info)``: ``info`` is ``round_tripped``'s bytes for a
    round-tripped format, None for ``Linear4bit`` layers (``q4lab.report`` counts those)."""
    from . import Q4Config, quantize_model

    if not isinstance(cfg, LabConfig):
        raise TypeError(f"cfg must be a q4lab.quality.LabConfig, got {type(cfg).__name__}")
    rows = linear_layers(model)
    chosen = select_layers(rows, cfg.layers, cfg.lm_head) if names is None else list(names)
    known = {r["name"] for r in rows}
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"no nn.Linear called {unknown[0]!r} in the model")
    if not chosen:
        raise ValueError(f"layers={cfg.layers!r} selects no linear layer of "
                         f"{type(model).__name__}")
    if cfg.family != "bnb":
        from .round_trip import FormatSpec, round_tripped

        spec = FormatSpec(cfg.quant_type, cfg.blocksize, cfg.double_quant)
        with round_tripped(model, spec, chosen) as info:
            yield model, info
        return
    keep = tuple(sorted(known - set(chosen)))
    originals = {r["name"]: model.get_submodule(r["name"]) for r in rows}
    q4cfg = Q4Config(quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                      double_quant=cfg.double_quant,
                      compute_dtype=getattr(torch, cfg.compute_dtype), skip_modules=keep,
                      min_numel=0)
    try:
        quantize_model(model, q4cfg, progress=False)
        yield model, None
    finally:
        for name, module in originals.items():
            _set_submodule(model, name, module)


# ---- text, perplexity, continuation --------------------------------------------------------------
_APACHE_SOURCES = ("safetensors", "huggingface_hub", "transformers", "tokenizers")


def default_text() -> str:
    """The Apache License 2.0 text, read at run time from the licence file of an installed
    dependency (safetensors, huggingface_hub or transformers ship it in their dist-info); the
    licence itself permits verbatim copies. Starts at its heading "Apache License"."""
    import importlib.metadata as md

    for dist in _APACHE_SOURCES:
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            continue
        for f in files:
            if "LICEN" not in f.name.upper():
                continue
            try:
                text = f.locate().read_text(encoding="utf-8")
            except OSError:
                continue
            start = text.find("Apache License")
            if start >= 0 and "Version 2.0, January 2004" in text:
                return text[start:]
    raise FileNotFoundError(f"no installed package among {_APACHE_SOURCES} ships the Apache "
                            f"License 2.0 text; pass text= yourself")


def text_tokens(tokenizer, text: str | None = None, tokens: int = 1024) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text`` (default :func:`default_text`), shape [1, n]
    (fewer if the text is shorter; at least 2 are needed to score one)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an int >= 2, got {tokens!r}")
    text = default_text() if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"the text gives {ids.shape[1]} token(s); perplexity needs at least 2")
    return ids


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids of shape [n] or [1, n], got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    return ids.long()


@torch.no_grad()
def perplexity(model: nn.Module, input_ids, window: int | None = None,
               stride: int | None = None) -> float:
    """exp(mean NLL) of ``input_ids`` under the causal LM ``model``; every token after the first
    is scored exactly once. Sequences up to ``window`` tokens (default: the model's
    ``max_position_embeddings``) take ONE forward pass; longer ones slide a window of ``window``
    tokens whose end moves by ``stride`` (default ``window // 2``, must be < ``window``), scoring
    only the tokens the previous window did not, so each token past the first window has at least
    ``window - stride`` tokens of context (the transformers guide "Perplexity of fixed-length
    models"). Logits are cast to float32 before the log-softmax; the sum of NLLs is kept in
    float64."""
    ids = _as_ids(input_ids)
    n = ids.numel()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or n
    window = min(n, limit) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    if window < n:
        stride = window // 2 if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < window:
            raise ValueError(f"stride must be an int in 1..{window - 1} (below window={window}, "
                             f"so that no token loses its context), got {stride!r}")
    device = next(model.parameters()).device
    nll, scored_to, end = 0.0, 1, min(window, n)  # tokens [1, scored_to) are already scored
    while True:
        begin = end - min(window, n)
        chunk = ids[begin:end].to(device)[None]
        logits = model(input_ids=chunk, use_cache=False).logits[0].float()
        pred = logits[scored_to - begin - 1:end - begin - 1]   # logits at j predict token j + 1
        nll += float(F.cross_entropy(pred, chunk[0, scored_to - begin:], reduction="sum").double())
        scored_to = end
        if end == n:
            return math.exp(nll / (n - 1))
        end = min(end + stride, n)


@torch.no_grad()
def continuation(model: nn.Module, tokenizer, prompt: str = PROMPT, new_tokens: int = 12) -> str:
    """Greedy continuation of ``prompt``: as the user turn of the chat template when the tokenizer
    has one (``q4lab.models.generate``), else of the plain text. Only the new text is returned."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens must be an int >= 0, got {new_tokens!r}")
    if new_tokens == 0:
        return ""
    if getattr(tokenizer, "chat_template", None):
        from .models import generate

        return generate(model, tokenizer, prompt, max_new_tokens=new_tokens)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---- one configuration --------------------------------------------------------------------------
@torch.no_grad()
def log_probs(model: nn.Module, input_ids) -> torch.Tensor:
    """Next-token log-probabilities (positions x vocab), float32, one forward pass."""
    ids = _as_ids(input_ids)[None].to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1).cpu()


def agreement(reference: torch.Tensor, other: torch.Tensor, input_ids) -> dict:
    """From next-token log-probabilities (:func:`log_probs`) of the source model
    (``reference``) and a quantized one (``other``) on ``input_ids``: ``kl`` = KL(p_ref ||
    p_other) summed over the vocabulary (float64), mean over positions; ``top1`` = the fraction
    of positions whose most likely next token is the same; ``perplexity`` of ``other`` =
    exp(mean NLL of the actual next tokens, float64)."""
    ids = _as_ids(input_ids)
    if reference.shape != other.shape or other.shape[0] != ids.numel() - 1:
        raise ValueError(f"log-probabilities {tuple(reference.shape)} / {tuple(other.shape)} "
                         f"do not match {ids.numel()} tokens (positions x vocab, one fewer "
                         f"position than tokens)")
    kl, positions = 0.0, other.shape[0]
    for i in range(0, positions, 128):  # float64 in slices: a 1024 x 49152 slab would be 400 MB
        ref, oth = reference[i:i + 128].double(), other[i:i + 128].double()
        kl += float((ref.exp() * (ref - oth)).sum())
    top1 = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    nll = -other.gather(1, ids[1:, None].to(other.device)).double().mean()
    return {"kl": kl / positions, "top1": float(top1), "perplexity": math.exp(float(nll))}


def evaluate(model: nn.Module, input_ids, cfg: LabConfig | None = None, tokenizer=None,
             prompt: str = PROMPT, new_tokens: int = 12, params: int | None = None,
             reference: torch.Tensor | None = None) -> dict:
    """Quantize ``model`` with ``cfg`` (None: evaluate the float model as it is), measure, restore.

    Returns ``label``, ``config`` (dict or None), ``family``, ``perplexity``, ``kl`` and
    ``top1`` (:func:`agreement` with ``reference``, the float model's :func:`log_probs` on
    ``input_ids``; None without one, or for a sequence longer than the model's window, which
    :func:`perplexity` slides over), ``tokens``, ``layers`` (how many are 4-bit),
    ``quantized_params``, ``stored_bytes`` and ``bits_per_param`` of the 4-bit layers (8 *
    stored bytes / their params; None for the float model), ``model_bytes`` (every distinct
    parameter and buffer plus the 4-bit states, ``q4lab.report``; a round-tripped format counts
    its stored bytes, not its float32 stand-ins) and ``model_bits_per_param`` (8 * model_bytes /
    ``params``, the float model's parameter count), ``continuation`` (needs ``tokenizer``; ""
    with ``new_tokens=0``) and ``seconds`` per step. With ``cfg`` None and a ``reference``, the
    reference is the measurement (no forward pass)."""
    from .report import model_bytes, report

    ids = _as_ids(input_ids)
    params = count_params(model) if params is None else params
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    one_pass = reference is not None and (window is None or ids.numel() <= window)
    t0 = time.perf_counter()
    ctx = _quantized(model, cfg) if cfg is not None else _as_is(model)
    with ctx as (m, info):
        t1 = time.perf_counter()
        if one_pass:
            lp = reference if cfg is None else log_probs(m, ids)
            measured = agreement(reference, lp, ids)
        else:
            measured = {"perplexity": perplexity(m, ids), "kl": None, "top1": None}
        t2 = time.perf_counter()
        text = continuation(m, tokenizer, prompt, new_tokens) \
            if tokenizer is not None and new_tokens else ""
        t3 = time.perf_counter()
        if info is None:
            total = report(m, note="").total
            nbytes = model_bytes(m)
        else:  # round trip: the stored bytes stand for the float32 stand-ins
            total = {"layers": info["layers"], "params": info["params"],
                     "bytes_after": info["bytes"], "bits_per_param": info["bits_per_param"]}
            nbytes = model_bytes(m) - info["float_bytes"] + info["bytes"]
    return {"label": cfg.label if cfg is not None else _float_label(model),
            "config": asdict(cfg) if cfg is not None else None,
            "family": cfg.family if cfg is not None else "float",
            **measured, "tokens": ids.numel(), "layers": total["layers"],
            "quantized_params": total["params"], "stored_bytes": total["bytes_after"],
            "bits_per_param": total["bits_per_param"], "model_bytes": nbytes,
            "model_bits_per_param": 8.0 * nbytes / params, "continuation": text,
            "seconds": {"quantize": t1 - t0, "perplexity": t2 - t1, "continuation": t3 - t2,
                        "total": time.perf_counter() - t0}}


@contextmanager
def _as_is(model):
    yield model, None


def _float_label(model) -> str:
    dtype = next(model.parameters()).dtype
    return f"{str(dtype).removeprefix('torch.')} model"


# ---- per-layer sensitivity -----------------------------------------------------------------------
@dataclass
class Sensitivity:
    """Perplexity change per (layer kind, depth) when that one layer is quantized alone.
    ``delta[i][j]`` belongs to ``kinds[i]`` at ``depths[j]`` (None where the model has no such
    layer or it was not asked for); ``base`` is the float model's perplexity; ``computed`` counts
    the cells evaluated by this call (the rest came from the cache)."""

    kinds: list
    depths: list
    delta: list
    base: float
    label: str
    computed: int


def _fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16]


class _FloatPrefix:
    """The float outputs of a model's decoder blocks on one token sequence, recorded in one
    forward pass, so that a pass in which only block ``d`` (or later) differs skips blocks
    0..d-1 and returns their recorded outputs (a causal stack: nothing before block d can see
    the change, so the result is bit for bit the full pass's). Enabled only where it is safe:
    every layer with a depth sits in ONE ``nn.ModuleList`` and each block ran exactly once."""

    def __init__(self, model: nn.Module, rows: list[dict]):
        prefixes = {r["name"][:re.search(r"(?:^|\.)(\d+)\.", r["name"]).start(1)].rstrip(".")
                    for r in rows}
        blocks = model.get_submodule(prefixes.pop()) if len(prefixes) == 1 else None
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else None
        self.outputs: dict = {}

    @contextmanager
    def recording(self):
        """Record each block's output during the float pass run inside the block."""
        if self.blocks is None:
            yield
            return
        calls: dict = {}

        def hook(module, _args, output, _i=None):
            calls.setdefault(module, []).append(output)

        handles = [b.register_forward_hook(hook) for b in self.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if all(len(calls.get(b, ())) == 1 for b in self.blocks):
            self.outputs = {i: calls[b][0] for i, b in enumerate(self.blocks)}

    @contextmanager
    def skipping(self, depth: int):
        """Blocks 0..depth-1 return their recorded float outputs (cloned) instead of running."""
        skipped = list(range(depth)) if self.outputs else []
        for i in skipped:
            out = self.outputs[i]
            self.blocks[i].forward = lambda *a, _o=out, **k: _clone(_o)
        try:
            yield
        finally:
            for i in skipped:
                del self.blocks[i].forward


def _clone(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_clone(o) for o in output) if type(output) is tuple else output
    return output


def sensitivity(model: nn.Module, input_ids, cfg: LabConfig = LabConfig(), kinds=None,
                depths=None, cache: dict | None = None, base: float | None = None,
                progress: bool = True, reuse_prefix: bool = True) -> Sensitivity:
    """For every linear layer with a depth (``kinds`` / ``depths`` restrict the grid), quantize
    that layer ALONE with ``cfg``'s format (its ``layers`` / ``lm_head`` are ignored) and record
    perplexity minus the float model's. ``cache`` (a dict the caller keeps) holds finished cells
    keyed by model, tokens, format and layer; cells already there are not recomputed.
    ``reuse_prefix``: a cell at depth d reuses the float outputs of blocks 0..d-1 from one
    recorded float pass instead of recomputing them (the same numbers, bit for bit; about half
    the work). Shows a tqdm.auto progress bar over the cells still to compute."""
    from tqdm.auto import tqdm

    ids = _as_ids(input_ids)
    rows = [r for r in linear_layers(model) if r["depth"] is not None]
    all_kinds = list(dict.fromkeys(r["kind"] for r in rows))
    all_depths = sorted({r["depth"] for r in rows})
    kinds = all_kinds if kinds is None else list(kinds)
    depths = all_depths if depths is None else list(depths)
    bad = [k for k in kinds if k not in all_kinds] + [d for d in depths if d not in all_depths]
    if bad:
        raise ValueError(f"no layer of kind/depth {bad[0]!r}; kinds are {all_kinds}, depths "
                         f"{all_depths[0]}..{all_depths[-1]}")
    cache = {} if cache is None else cache
    fmt = (id(model), _fingerprint(ids), cfg.quant_type, cfg.blocksize, cfg.double_quant,
           cfg.compute_dtype)
    names = {(r["kind"], r["depth"]): r["name"] for r in rows}
    todo = [(k, d) for k in kinds for d in depths if (k, d) in names
            and (*fmt, k, d) not in cache]
    prefix = _FloatPrefix(model, rows)
    if todo and reuse_prefix or base is None and (*fmt[:2], "float") not in cache:
        with prefix.recording() if todo and reuse_prefix else _as_is(model):
            cache[(*fmt[:2], "float")] = perplexity(model, ids)
    base = cache[(*fmt[:2], "float")] if base is None else base
    for k, d in tqdm(todo, desc=f"sensitivity ({cfg.label.split()[0]})", unit="layer",
                     disable=not progress):
        with quantized(model, cfg, names=[names[(k, d)]]) as m, prefix.skipping(d):
            cache[(*fmt, k, d)] = perplexity(m, ids) - base
    delta = [[cache.get((*fmt, k, d)) if (k, d) in names else None for d in depths]
             for k in kinds]
    return Sensitivity(kinds, depths, delta, base, cfg.label.split()[0], len(todo))


# ---- the Pareto front ----------------------------------------------------------------------------
def pareto_front(points) -> list[int]:
    """Indices of the points (x, y) that no other point beats on both (smaller x AND smaller y,
    one of them strictly): bits/param vs perplexity, both lower-is-better. Sorted by x; of
    identical points the first is kept."""
    pts = [(float(x), float(y)) for x, y in points]
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in pts):
        raise ValueError("pareto_front needs finite (x, y) points")
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1], i))
    front, best_y = [], math.inf
    for i in order:
        if pts[i][1] < best_y:
            front.append(i)
            best_y = pts[i][1]
    return front


__all__ = ["LabConfig", "PAPER_TABLE", "BLOCKSIZES", "LAYER_CHOICES", "COMPUTE_DTYPES", "PROMPT",
           "linear_layers", "select_layers", "count_params", "quantized", "default_text",
           "text_tokens", "perplexity", "continuation", "log_probs", "agreement", "evaluate",
           "Sensitivity", "sensitivity", "pareto_front"]
