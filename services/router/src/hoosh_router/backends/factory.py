"""One backend per configured provider, by its type."""

from __future__ import annotations

from ..config import ProviderConfig
from .anthropic import AnthropicBackend
from .base import Backend
from .gemini import GeminiBackend
from .local import LocalBackend
from .openai_compat import OpenAICompatibleBackend


def build_backend(config: ProviderConfig, inference_addr: str) -> Backend:
    """The backend speaking ``config.type``'s wire format (clients are built here, once)."""
    if config.type == "local":
        return LocalBackend(config, inference_addr)
    if config.type == "anthropic":
        return AnthropicBackend(config)
    if config.type == "gemini":
        return GeminiBackend(config)
    return OpenAICompatibleBackend(config)
