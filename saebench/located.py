"""Where a suite entry's problem is, and how it reads: the located errors every resolver
and dictionary format raises (`suite.yaml:12: dictionaries.mine: ...`), paths relative to
the suite file, and failed hub downloads turned into `HubUnavailable` (a skip, not a crash).
Imports nothing heavy.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from saebench.suite import SuiteError

_HUB_HINT = ("run once with network access (gated repos also need a token: `hf auth login`) "
             "to fill the local cache; HF_HUB_OFFLINE=1 then loads from the cache only")


class HubUnavailable(RuntimeError):
    """A hub download was needed and failed (offline, not found, gated).

    The message names the suite entry (`file:line: field`) and what was being fetched; the
    pytest plugin turns it into a skip with this reason.
    """


def where_of(suite_path: Path | None, line: int, field: str) -> str:
    """`suite.yaml:12: field`, `suite.yaml: field` or `field`, as much as is known."""
    if suite_path is None:
        return field
    return f"{suite_path}:{line}: {field}" if line else f"{suite_path}: {field}"


def error_at(suite_path: Path | None, line: int, field: str, message: str) -> ValueError:
    """A SuiteError at the entry when its line is known, else a located ValueError."""
    if suite_path is not None and line:
        return SuiteError(str(suite_path), line, field, message)
    return ValueError(f"{where_of(suite_path, line, field)}: {message}")


def local_path(path: str, suite_path: Path | None) -> Path:
    """`path`, relative to the suite file's directory when it is relative."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and suite_path is not None:
        resolved = Path(suite_path).parent / resolved
    return resolved


def first_line(err: BaseException, limit: int = 160) -> str:
    """`ErrorType: first line of its message`, cut to about `limit` characters."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


@contextmanager
def hub_access(where: str, what: str) -> Iterator[None]:
    """Turn a failed download inside the block into HubUnavailable naming `where` and `what`:
    what huggingface_hub, transformers, datasets and sae_lens raise then is an OSError
    (offline, missing entry, gated or unknown repo), an httpx error raised outside
    huggingface_hub's wrappers, a `datasets` error, or a ValueError saying offline."""
    import datasets
    import httpx

    try:
        yield
    except (OSError, httpx.HTTPError, datasets.exceptions.DatasetsError, ValueError) as err:
        if isinstance(err, ValueError) and "offline" not in str(err).lower():
            raise
        raise HubUnavailable(f"{where}: could not download {what} from the Hugging Face Hub "
                             f"({first_line(err)}); {_HUB_HINT}") from err


def suggest(word: str, choices: Iterable[str]) -> str:
    """`; close matches: a, b` for the choices close to `word`, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(close)}" if close else ""
