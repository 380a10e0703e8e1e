"""The package version, read from the installed metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hooktrace")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
