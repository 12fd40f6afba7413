"""Benchmarks and the OpenAI-compatible upstream stand-in they (and the tests) use."""
