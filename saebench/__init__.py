"""saebench: a pytest-native harness for the faithfulness of SAEs and transcoders.

    >>> from saebench import evaluate, loading
    >>> df = evaluate(loading.load_zoo_model(), loading.load_zoo_dictionary("resid-L2-topk16"),
    ...               loading.load_heldout_tokens()[:64])

PYTEST_DONT_REWRITE: saebench's asserts are not tests, and `saebench run` imports the
package before pytest loads its plugin (which would otherwise warn that it cannot rewrite).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate"]


def __getattr__(name: str) -> Any:
    """`saebench.evaluate` is imported lazily so that `import saebench` stays light."""
    if name == "evaluate":
        from saebench.api import evaluate

        return evaluate
    raise AttributeError(f"module 'saebench' has no attribute {name!r}")
