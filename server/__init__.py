"""Kaizen server: an OpenAI-compatible completion API over vLLM that records every completion."""
