"""`python -m saebench ...` is the `saebench` command."""

from saebench.cli import main

raise SystemExit(main())
