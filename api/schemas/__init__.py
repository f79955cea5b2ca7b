"""Pydantic request and response models: the edge of the service (OpenAI shapes)."""
