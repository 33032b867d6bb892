"""``q4lab.hf_peft`` is the old name of ``q4lab.formats.peft``:
importing either gives the same module object."""
import sys
from importlib import import_module

sys.modules[__name__] = import_module("q4lab.formats.peft")
