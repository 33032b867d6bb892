"""``q4lab.checkpoint`` is the old name of ``q4lab.formats.shards``:
importing either gives the same module object."""
import sys
from importlib import import_module

sys.modules[__name__] = import_module("q4lab.formats.shards")
