"""Database models and sessions. Imports no FastAPI, so the worker uses it too."""
