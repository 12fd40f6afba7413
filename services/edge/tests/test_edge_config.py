"""Settings fail fast: open auth only on loopback and never in production; production
needs a real admin key; the key never appears in a validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hoosh_edge.config import Settings, is_loopback
from pydantic import ValidationError

KEY = "k" * 40
# The edge's internal-plane token (production requires one; the checks below are others).
INTERNAL_TOKEN = "edge-internal-token-0123456789"


def settings(**values: object) -> Settings:
    values.setdefault("internal_token", INTERNAL_TOKEN)
    values.setdefault("internal_plaintext", "allow")  # no certificates in these tests
    return Settings(**values)  # type: ignore[arg-type]


def test_production_needs_the_internal_token() -> None:
    with pytest.raises(ValidationError, match="HOOSH_INTERNAL_TOKEN is required"):
        settings(env="production", admin_key=KEY, internal_token=None)
    assert settings(env="production", admin_key=KEY).token() == INTERNAL_TOKEN


def test_defaults_are_closed() -> None:
    assert settings().auth == "keys"
    assert settings().env == "development"
    assert settings().admin_keys == []
    assert settings().tenancy_key_prefix == "hoosh:tenancy:"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_open_auth_on_loopback_is_allowed(host: str) -> None:
    assert is_loopback(host)
    assert settings(auth="open", edge_host=host).auth == "open"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "edge.example.com", ""])
def test_open_auth_elsewhere_is_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        settings(auth="open", edge_host=host)


def test_production_refuses_open_auth_even_on_loopback() -> None:
    with pytest.raises(ValidationError, match="refused in production"):
        settings(env="production", auth="open", admin_key=KEY)


def test_production_needs_a_real_admin_key() -> None:
    with pytest.raises(ValidationError, match="needs a bootstrap admin key"):
        settings(env="production")
    with pytest.raises(ValidationError, match="shorter than 32"):
        settings(env="production", admin_key="changeme")
    assert settings(env="production", admin_key=KEY, edge_host="0.0.0.0").admin_keys == [KEY]


def test_admin_key_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "admin.key"
    path.write_text(KEY + "\n")
    assert settings(admin_key_file=path).admin_keys == [KEY]
    with pytest.raises(ValidationError, match="not both"):
        settings(admin_key_file=path, admin_key=KEY)
    with pytest.raises(ValidationError, match="cannot be read"):
        settings(admin_key_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match="empty"):
        settings(admin_key_file=tmp_path / "empty")


def test_key_records_need_one_redis_node() -> None:
    with pytest.raises(ValidationError, match="HOOSH_TENANCY_REDIS_URL"):
        settings(redis_url="redis+cluster://127.0.0.1:7000")
    both = settings(redis_url="redis+cluster://127.0.0.1:7000", tenancy_redis_url="redis://127.0.0.1:6379/0")
    assert both.key_store_redis_url == "redis://127.0.0.1:6379/0"


def test_validation_errors_never_show_the_key() -> None:
    with pytest.raises(ValidationError) as caught:
        settings(env="production", admin_key="short-secret-value")
    assert "short-secret-value" not in str(caught.value)
    assert "short-secret-value" not in repr(settings(admin_key="short-secret-value"))


def test_the_service_refuses_to_start_open_in_production(tmp_path: Path) -> None:
    env = {
        "HOOSH_ENV": "production",
        "HOOSH_AUTH": "open",
        "HOOSH_ADMIN_KEY": KEY,
        "HOOSH_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "HOOSH_INTERNAL_PLAINTEXT": "allow",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "hoosh_edge"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2
    assert "refused in production" in done.stderr + done.stdout
    assert KEY not in done.stderr + done.stdout


def test_the_budget_prefix_takes_no_hash_tag() -> None:
    with pytest.raises(ValidationError, match="braces"):
        settings(budget_key_prefix="hoosh:{budget}:")
    assert settings().budget_key_prefix == "hoosh:budget:"  # the router's default: the same limit windows
