"""Backends the router can call: the local-inference worker (gRPC), OpenAI-compatible
HTTP providers, Anthropic's Messages API and Google's Gemini API."""
