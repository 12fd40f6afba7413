"""Backends the router can call: the local-inference worker (gRPC) and
OpenAI-compatible HTTP providers."""
