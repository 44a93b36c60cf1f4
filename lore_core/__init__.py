"""lore_core: the LoRe reward engine in plain numpy/torch (no Flower), importable on a device.

Heavy dependencies (torch, transformers) are imported only by the modules that need them,
so `import lore_core.pairs` or `lore_core.simplex_fit` stays numpy-only.
"""

__version__ = "0.2.5"
