"""Dagster-side helpers shared by the asset modules in ``defs/`` (kept out of the autoloaded tree)."""
