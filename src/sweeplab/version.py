"""The package version, on the ground floor: every layer may read it (track/ tags each run with it)."""

__version__ = "0.1.0"
