"""Suite-wide settings: offline model hubs and clean CUDA skips.

Notebooks run at full size by default (``Q4LAB_FAST`` is not set here; the tests that run a notebook
a second time, the browser and Binder ones, set it for themselves). Tests marked ``cuda`` are
skipped with a reason when torch sees no GPU (CI has none)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
