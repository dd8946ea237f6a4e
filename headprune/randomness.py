"""Seeds derived from (run seed, purpose, step), so that every random draw of a run depends only
on its seed and step: not on what ran before it in the process, not on evaluation between steps,
and not on whether the run was resumed."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(device, *parts) -> torch.Generator:
    """A fresh generator on `device` seeded from `parts`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def keeps_global_rng(fn):
    """Run `fn` and give the caller back the global RNG states (Python, NumPy, torch) it had:
    a recipe seeds them for its own use, and the caller's code after it draws what it would have."""
    import functools
    import random

    import numpy as np

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        python, numpy = random.getstate(), np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            try:
                return fn(*args, **kwargs)
            finally:
                random.setstate(python)
                np.random.set_state(numpy)
    return wrapper
