"""Registers the saebench pytest plugin for this checkout (installed, it registers itself)."""

pytest_plugins = ["saebench.plugin"]
