"""``q4lab.plan_qlora``: per-rank bytes of an FSDP-QLoRA run, by part, before running it.

Storage parts are exact arithmetic over the format (``q4lab.state.storage_bytes_for``: codes,
absmax codes, nested absmax, offset) split by FSDP2's rule (each 1-D parameter in ceil(n / world)
chunks); tests/test_plan.py checks them against ``q4lab.distributed.memory_by_part`` measured by
bench/bench_fsdp.py. Transient parts are estimates: FSDP gathers one decoder layer and prefetches
the next (2 whole 4-bit layers), the largest linear layer is dequantized in the compute dtype in
forward and again in backward, the root module (embeddings, lm_head, final norm) stays gathered;
activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4.1, per layer
and token) for Llama's blocks (the attention-score term dropped: fused/flash attention), plus LoRA's
dropout copies of each adapted input; with gradient checkpointing only each layer's input is kept
and one layer is recomputed; the loss keeps bf16 logits, their float32 copy and its gradient.
``allocator_overhead`` (default 10 %) stands for the caching allocator's reserve over what is
allocated (PyTorch reports *reserved* memory as the peak). Answer.AI's published FSDP-QLoRA runs
(github.com/AnswerDotAI/fsdp_qlora, benchmarks_03_2024.md: 2 x 24 GB, bf16, LoRA r=64 on every
linear layer, reentrant gradient checkpointing) are reproduced within ``MARGIN``
(tests/test_plan.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .state import storage_bytes_for

GIB = 2**30
MARGIN = 0.25  # the planner's stated accuracy on a device's peak reserved memory

#: transformers config fields of the models the notebook's widget offers
PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "yi-34b": dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                   num_attention_heads=56, num_key_value_heads=8, vocab_size=64000),
}


@dataclass
class QLoRAPlan:
    """Bytes per rank: ``device`` (on the accelerator) and ``cpu`` (offloaded), by part."""
    device: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    device_memory: int | None = None

    @property
    def device_total(self) -> int:
        return int(sum(self.device.values()))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.device_total <= self.device_memory

    def as_dict(self) -> dict:
        return {**asdict(self), "device_total": self.device_total, "fits": self.fits}

    def __repr__(self) -> str:
        rows = [f"{k:>22} {v / GIB:8.2f} GiB" for k, v in self.device.items()]
        rows += [f"{'device total':>22} {self.device_total / GIB:8.2f} GiB"
                 + ("" if self.fits is None else f"  ({'fits' if self.fits else 'does NOT fit'}"
                                                 f" in {self.device_memory / GIB:.1f} GiB)")]
        rows += [f"{'cpu ' + k:>22} {v / GIB:8.2f} GiB" for k, v in self.cpu.items()]
        return "QLoRAPlan (per rank)\n" + "\n".join(rows)


def _config(model) -> dict:
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown model {model!r}; presets: {sorted(PRESETS)}, or pass a "
                             f"transformers config / dict with hidden_size, intermediate_size ...")
        return dict(PRESETS[model])
    cfg = model if isinstance(model, dict) else model.to_dict()
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks {missing}")
    out = {k: int(cfg[k]) for k in need}
    out["num_key_value_heads"] = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(out, in) of the 7 linear layers of one Llama decoder layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def _shard(n: int, world: int) -> int:
    return -(-n // world)


def plan_qlora(model="llama-2-70b", world_size: int = 2, device_memory: float | None = 24 * GIB,
               seq_len: int = 2048, batch: int = 1, lora_rank: int = 64,
               gradient_checkpointing: bool = True, optimizer: str = "adamw",
               offload_params: bool = False, offload_optimizer: bool | None = None,
               blocksize: int = 64, double_quant: bool = True, param_bytes: int = 2,
               adapter_bytes: int = 2, lora_dropout: bool = True,
               allocator_overhead: float = 0.10) -> QLoRAPlan:
    """Per-rank bytes of QLoRA under FSDP: ``model`` is a preset name (``PRESETS``), a
    transformers config or a dict of its fields; ``batch`` is rows per rank; LoRA of rank
    ``lora_rank`` on every linear layer. ``offload_params`` keeps the sharded parameters,
    gradients and (unless ``offload_optimizer=False``) optimizer state in CPU memory, as FSDP's
    CPU offload does. Returns a :class:`QLoRAPlan` (``.device``, ``.cpu`` by part, ``.fits``)."""
    for name, v in (("world_size", world_size), ("seq_len", seq_len), ("batch", batch),
                    ("lora_rank", lora_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}: 'adamw' (2 states per trainable value, in "
                         f"the adapters' dtype) or 'sgd' (none)")
    cfg = _config(model)
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    offload_optimizer = offload_params if offload_optimizer is None else offload_optimizer
    shapes = linear_shapes(cfg)
    per_layer = [storage_bytes_for(o * i, blocksize, double_quant) for o, i in shapes]
    codes = sum(_shard(p["packed"], world_size) for p in per_layer) * layers
    stats = sum(_shard(sum(v for k, v in p.items() if k != "packed"), world_size)
                for p in per_layer) * layers
    layer_4bit = sum(sum(p.values()) for p in per_layer)
    lora_per_layer = sum(lora_rank * (o + i) for o, i in shapes)
    adapters = _shard(lora_per_layer * adapter_bytes, world_size) * layers
    embed = vocab * h * param_bytes * (1 if cfg.get("tie_word_embeddings") else 2)
    norms = (2 * layers + 1) * h * param_bytes
    frozen = _shard(embed + norms, world_size)
    grads = adapters
    states = {"adamw": 2 * adapter_bytes, "sgd": 0}[optimizer]  # exp_avg, exp_avg_sq
    optim = _shard(lora_per_layer * states, world_size) * layers

    device, cpu = {}, {}
    (cpu if offload_params else device).update(
        base_4bit=codes, statistics=stats, other_frozen=frozen, adapters=adapters,
        gradients=grads)
    (cpu if offload_optimizer else device)["optimizer"] = optim
    tokens = batch * seq_len
    o_max, i_max = max(shapes, key=lambda s: s[0] * s[1])
    device["gathered_layers"] = 2 * (layer_4bit + lora_per_layer * adapter_bytes)
    device["gathered_root"] = embed + norms if world_size > 1 else 0
    device["dequantized_weight"] = 2 * o_max * i_max * param_bytes
    device["layer_gradients"] = lora_per_layer * adapter_bytes  # one layer before reduce-scatter
    device["activations"] = _activations(cfg, tokens, param_bytes, gradient_checkpointing,
                                         lora_dropout, lora_rank)
    device["logits"] = tokens * vocab * (param_bytes + 4 + 4)  # bf16, float32 copy, its grad
    device["allocator_overhead"] = int(allocator_overhead * sum(device.values()))
    return QLoRAPlan(device={k: int(v) for k, v in device.items()},
                     cpu={k: int(v) for k, v in cpu.items()},
                     device_memory=None if device_memory is None else int(device_memory))


def _activations(cfg, tokens, nbytes, checkpointing, dropout, rank) -> int:
    """Bytes of activations kept for backward (per rank)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    # one layer, per token: norm outputs (2h), q/k/v (h + 2kv), attention output (h), residual
    # inputs (2h); MLP gate and up outputs, SiLU, product (4i); LoRA A outputs (7 r)
    per_token = nbytes * (6 * h + 2 * kv + 4 * i + 7 * rank)
    if dropout:  # PEFT applies dropout to each adapted input: a copy of it (6 of size h, 1 of i)
        per_token += nbytes * (6 * h + i)
    one_layer = per_token * tokens
    if not checkpointing:
        return one_layer * layers
    return tokens * h * nbytes * layers + one_layer  # each layer's input + one recomputed layer
