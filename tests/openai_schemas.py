"""Validation against the schemas of OpenAI's published OpenAPI document
(../shared/reference/openai-openapi.yaml, OpenAPI 3.1: its schemas are JSON Schema 2020-12),
loaded once per process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"
_URI = "urn:openai-openapi"


def available() -> bool:
    return SPEC.is_file()


@functools.cache
def _registry() -> Registry[Any]:
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
