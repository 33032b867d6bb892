"""q4lab.formats: every file format q4lab reads or writes, in one place.

- ``bnb``               bitsandbytes 4-bit state dicts and ``bnb.nn.Linear4bit`` layers, both ways
- ``safetensors_file``  ``q4lab.save`` / ``q4lab.load``: one model in one safetensors file
- ``shards``            safetensors shards tensor by tensor (read, write, index), no memory map
- ``hf``                transformers model directories (``save_pretrained`` / ``from_pretrained``)
- ``peft``              LoRA adapter files: PEFT directories and q4lab's single file
                        (``save_adapters`` / ``load_adapters`` / ``read_adapters``)
- ``stream``            ``quantize_checkpoint``: a checkpoint larger than memory, a tensor at a time
- ``atomic``            transactional writes every writer above goes through (docs/data-safety.md)

The old module names (``q4lab.interop``, ``q4lab.files``, ``q4lab.checkpoint``, ``q4lab.hf``,
``q4lab.hf_peft``, ``q4lab.stream``) still import: each is the module above under its old name.
"""
