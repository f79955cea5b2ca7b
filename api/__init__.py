"""AsFT Service HTTP API (FastAPI). Never imports torch: the API image has no ML stack."""
