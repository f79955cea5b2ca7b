"""A small Python client of AsFT Service (httpx only; no torch)."""
