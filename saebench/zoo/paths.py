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


def build_target_problem(out: Path) -> str | None:
    """Why `saebench zoo build` must not write into `out` (one line), or None: the zoo of an
    installed package (not a source checkout, whose zoo is rebuilt on purpose), or a
    non-empty directory that is not a zoo (no manifest.json): a build never overwrites
    what it did not create."""
    out = Path(out).resolve()
    package_zoo = ARTIFACTS.resolve()
    checkout = (package_zoo.parents[2] / ".git").exists()
    if (out == package_zoo or package_zoo in out.parents) and not checkout:
        return (f"{out} is the installed saebench package's zoo, which a build would "
                "overwrite; build into a directory of your own (--out DIR)")
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        return f"{out} holds files that are not a zoo (no {MANIFEST}); give a new directory"
    return None
