"""Where the zoo's artifacts live inside a zoo directory, and how they are fingerprinted."""

from __future__ import annotations

import hashlib
from pathlib import Path

ARTIFACTS = Path(__file__).parent / "artifacts"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
MODEL = "model"
HELDOUT_TOKENS = "tokens/heldout.safetensors"


def task_file(task: str) -> str:
    """Relative path of a task's prompt set (JSONL)."""
    return f"tasks/{task}.jsonl"


def dictionary_dir(name: str) -> str:
    """Relative path of a dictionary's sae_lens directory."""
    return f"dictionaries/{name}"


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
