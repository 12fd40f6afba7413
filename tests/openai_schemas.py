"""Validation against the schemas of OpenAI's published OpenAPI document
(../shared/reference/openai-openapi.yaml, OpenAPI 3.1: its schemas are JSON Schema 2020-12),
loaded once per process."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def _find_spec() -> Path:
    """HOOSH_OPENAI_SPEC, else shared/reference/openai-openapi.yaml beside the checkout
    or beside any directory above it (a clone elsewhere sets the variable)."""
    given = os.environ.get("HOOSH_OPENAI_SPEC", "").strip()
    if given:
        return Path(given)
    for parent in Path(__file__).resolve().parents[1:]:
        candidate = parent / "shared" / "reference" / "openai-openapi.yaml"
        if candidate.is_file():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"


SPEC = _find_spec()
_URI = "urn:openai-openapi"


def available() -> bool:
    return SPEC.is_file()


def require() -> None:
    """Fail (never skip) when the spec is missing: the responses tests check much more
    than the schemas, and a missing file must not hide them."""
    if not available():
        pytest.fail(f"OpenAI's OpenAPI document is not at {SPEC}: set HOOSH_OPENAI_SPEC to its path")


@functools.cache
def _registry() -> Registry[Any]:
    require()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as handle:
        spec = yaml.load(handle, Loader=loader)
    return Registry().with_resource(_URI, Resource.from_contents(spec, default_specification=DRAFT202012))


@functools.cache
def _validator(schema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{schema}"}, registry=_registry())


def errors(instance: Any, schema: str) -> list[str]:
    """Every way ``instance`` fails OpenAI's ``schema`` (empty: it validates)."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message[:300]}"
        for error in _validator(schema).iter_errors(instance)
    ]


def assert_valid(instance: Any, schema: str) -> None:
    problems = errors(instance, schema)
    assert not problems, f"not a valid {schema}: {problems}"
