"""q4lab: 4-bit weight quantization the way QLoRA and bitsandbytes do it, made visible.

``q4lab.reference`` is the NumPy specification (importable without torch). Everything else is the
torch front end, loaded lazily on first access so that ``from q4lab import reference`` never imports
torch: ``quantize_4bit`` / ``dequantize_4bit`` / ``backends`` (ops), ``Linear4bit`` /
``Q4Config`` (nn), ``quantize_model`` (quantize), ``report``, ``add_lora`` (lora), every file
format (``formats``: ``save`` / ``load``, bitsandbytes state dicts, transformers and PEFT
directories, streaming), ``widgets`` and ``models``.
"""
from importlib import import_module

from .state import QuantState, bits_per_param, storage_bytes

__version__ = "0.1.0"

_LAZY = {
    "quantize_4bit": "ops", "dequantize_4bit": "ops", "backends": "ops", "matmul_4bit": "matmul",
    "Linear4bit": "nn", "Q4Config": "nn", "quantize_model": "quantize",
    "save": "formats.safetensors_file", "load": "formats.safetensors_file",
    "report": "report", "Report": "report",
    "add_lora": "lora", "merge_lora": "lora", "unmerge_lora": "lora", "LoRALinear4bit": "lora",
    "save_adapters": "formats.peft", "load_adapters": "formats.peft", "training_memory": "lora",
    "to_bnb_state_dict": "formats.bnb", "from_bnb_state_dict": "formats.bnb",
    "save_pretrained": "formats.hf", "from_pretrained": "formats.hf",
    "quantize_checkpoint": "formats.stream", "plan_qlora": "plan",
}
_SUBMODULES = ("reference", "widgets", "models", "testing", "ops", "nn", "report", "lora",
               "interop", "quantize", "files", "metrics", "matmul", "constants")
_SUBMODULES += ("hf", "checkpoint", "stream")
_SUBMODULES += ("quality", "formats")
_SUBMODULES += ("storage", "distributed", "plan", "finetune")

__all__ = ["QuantState", "bits_per_param", "storage_bytes", *_LAZY, *_SUBMODULES]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'q4lab' has no attribute {name!r}")
    globals()[name] = value
    return value
