"""What the API and the worker share: the database and its models, the job state machine and
every function that moves a job, artifact storage, the queue and its broker, webhooks and
settings.

It never imports FastAPI, the API or the worker, and never raises HTTP errors: the API maps
its exceptions to answers.
"""
