"""hoosh edge: the OpenAI-compatible HTTP API (FastAPI)"""

from hoosh_common.lean_imports import inherited

# An edge worker spawned by ``python -m hoosh_edge`` (HOOSH_EDGE_WORKERS > 1) keeps
# aiohttp out as its parent does; anywhere else (tests, tools) this does nothing.
inherited()
