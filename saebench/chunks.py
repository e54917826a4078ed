"""Memory budgets for logits: sizes such as "512MiB", and positions per chunk from them.

A model's logits over a batch are [batch, seq, vocab]; with a 256,000-token vocabulary
(Gemma) one batch of them is gigabytes, and the engine needs several such tensors at once
(the clean log-probs, a variant's logits and log-probs, a KL temporary). So the engine and
the task runner send the final residual stream through the unembedding a chunk of
positions at a time: `positions_per_chunk` turns a budget in bytes (or an explicit count)
into the positions of one chunk, and `spans` cuts the positions into chunks.

    >>> parse_size("512MiB"), parse_size("2GB"), parse_size(4096)
    (536870912, 2000000000, 4096)
    >>> positions_per_chunk(256_000, max_memory=parse_size("1GiB"))
    262
    >>> list(spans(10, 4))
    [(0, 4), (4, 8), (8, 10)]

Chunking changes nothing but the order of float rounding in the unembedding: every
logit-derived quantity is per position, so a chunk boundary may fall anywhere, inside a
sequence included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

DEFAULT_MAX_MEMORY = 1 << 30
"""The default budget (1 GiB) of one chunk's logits-sized tensors: small vocabularies (the
toy zoo's) are never chunked at the usual batch sizes, large ones are."""

LIVE_TENSORS = 4
"""Logits-sized tensors the engine holds at once for one chunk: the clean log-probs and
probabilities, a variant's log-probs and one temporary (its logits, or the KL terms)."""

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
SIZE_FORMS = "a number of bytes or a size such as 512MiB, 2GB, 1.5GiB"


def parse_size(value: int | str | None) -> int | None:
    """Bytes from a positive integer or a size string ("512MiB", "2GB", "1.5GiB", "4096";
    decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB, case-insensitive); None stays None.

    ValueError, naming the accepted forms, for anything else: zero, a negative or
    fractional byte count, an unknown unit, a bool.

        >>> parse_size("1.5 GiB")
        1610612736
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"memory size {value!r}: expected {SIZE_FORMS}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match[2].lower() if match else None
        if unit not in _UNITS:
            raise ValueError(f"memory size {value!r}: expected {SIZE_FORMS}")
        exact = float(match[1]) * _UNITS[unit]
        size = math.floor(exact)
        if unit in ("", "b") and size != exact:
            raise ValueError(f"memory size {value!r}: a byte count must be whole")
    if size < 1:
        raise ValueError(f"memory size {value!r}: expected a positive size ({SIZE_FORMS})")
    return size


def check_positions(value: int | None) -> int | None:
    """`value` when it is None or a positive integer (positions per chunk); ValueError
    otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"chunk positions {value!r}: expected a positive integer")
    return value


def positions_per_chunk(d_vocab: int, *, max_memory: int | str | None = None,
                        chunk_positions: int | None = None, bytes_per_value: int = 4,
                        tensors: int = LIVE_TENSORS) -> int:
    """Positions per chunk: `chunk_positions` when given, else as many as keep `tensors`
    logits-sized tensors of `bytes_per_value`-byte values within `max_memory` bytes
    (`DEFAULT_MAX_MEMORY` when None); never fewer than one position, so a budget below
    one position's tensors still runs, one position at a time.

        >>> positions_per_chunk(50_000, max_memory=1 << 20)   # 800 kB per position
        1
        >>> positions_per_chunk(50_000, chunk_positions=7)
        7
    """
    if check_positions(chunk_positions) is not None:
        return chunk_positions
    budget = parse_size(max_memory) or DEFAULT_MAX_MEMORY
    return max(1, budget // (tensors * bytes_per_value * max(d_vocab, 1)))


def spans(total: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `range(total)` in order."""
    for start in range(0, total, size):
        yield start, min(start + size, total)
