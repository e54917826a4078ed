"""`python -m saebench.zoo build|info` — the same as `saebench zoo build|info`."""

import sys

from saebench.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["zoo", *sys.argv[1:]]))
