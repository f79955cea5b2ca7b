"""Celery app and thin tasks that glue the database to ``asft_core``."""
