"""Provider names are plain identifiers."""

from __future__ import annotations

import pytest
from hoosh_router.config import ProviderConfig
from pydantic import ValidationError


@pytest.mark.parametrize("name", ["my openai", "", "a/b", "x" * 65, "-lead"])
def test_a_provider_name_is_plain(name: str) -> None:
    """Names reach URLs (provider/model), events and the cost ledger."""
    with pytest.raises(ValidationError):
        ProviderConfig(name=name, type="openai")
