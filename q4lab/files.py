"""``q4lab.files`` is the old name of ``q4lab.formats.safetensors_file``:
importing either gives the same module object."""
import sys
from importlib import import_module

sys.modules[__name__] = import_module("q4lab.formats.safetensors_file")
