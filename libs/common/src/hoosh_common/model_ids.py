"""The one rule for a model id that may reach an upstream URL or body, shared by the
edge (400 before anything else sees it) and the router (which any internal caller can
reach directly)."""

from __future__ import annotations

import re

MAX_MODEL_ID_LENGTH = 256
_MODEL_ID_CHARACTERS = re.compile(r"[A-Za-z0-9._:/@+-]+")


def model_id_problem(model: str) -> str | None:
    """Why ``model`` is not a safe model id, or None when it is: at most 256 characters of
    ``[A-Za-z0-9._:/@+-]`` and no empty, ``.`` or ``..`` segment between slashes."""
    if not model:
        return "model is required"
    if len(model) > MAX_MODEL_ID_LENGTH:
        return f"model must be at most {MAX_MODEL_ID_LENGTH} characters"
    if _MODEL_ID_CHARACTERS.fullmatch(model) is None:
        return "model may contain only letters, digits and . _ : / @ + -"
    if any(segment in ("", ".", "..") for segment in model.split("/")):
        return "model must not contain empty, '.' or '..' path segments"
    return None
