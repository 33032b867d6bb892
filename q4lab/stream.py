"""``q4lab.stream`` is the old name of ``q4lab.formats.stream``:
importing either gives the same module object."""
import sys
from importlib import import_module

sys.modules[__name__] = import_module("q4lab.formats.stream")
