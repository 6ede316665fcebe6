"""Streaming chat gateway: LLM answers over SSE, WebSocket and an OpenAI-compatible API."""

__version__ = "0.1.0"
