"""Narrow filters for a few harmless messages that importing transformers prints once torchao is
installed (splice's `quantize` extra): torchao's "Failed to load <compiled CUDA extension>" on a
machine without CUDA (NF4 does not use them) and torch's deprecation of an enum registration that
torchao makes; and, on a CPU with AVX512-BF16, bitsandbytes' notice that it cannot fetch its
optional hub kernel (offline; it uses its built-in CPU kernel instead) with the `kernels`
package's note that it skipped the hub's trust check. Any other message of those loggers still
shows. Importing this module installs them, so `splice/__init__.py` imports it before anything
that imports transformers."""

from __future__ import annotations

import logging

HARMLESS = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
}


class _DropHarmless(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


for _name, _fragments in HARMLESS.items():
    logging.getLogger(_name).addFilter(_DropHarmless(_fragments))
