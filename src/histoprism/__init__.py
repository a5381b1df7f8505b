"""histoprism."""

from ._core.version import __version__
