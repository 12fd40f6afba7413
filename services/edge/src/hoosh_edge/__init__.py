"""hoosh edge: the OpenAI-compatible HTTP API (FastAPI)"""
