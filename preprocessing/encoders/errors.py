"""The encoder-name error, shared by the registry and the timm builder (which the registry imports lazily)."""

from __future__ import annotations

from wsicore.errors import ConfigError


class UnknownEncoderError(ConfigError, ValueError):
    """An encoder or timm model name that does not exist here (or would have to be downloaded)."""
