"""What runs where tasks run: in a Celery worker, and in any process that publishes
tasks (a Django or Flask web app). The bridge's signal handlers, the in-task
progress API, the one Redis write per event, the worker's own Celery app and the
demo tasks.

Nothing here imports aiohttp, jinja2 or rich: a worker installs none of the web's
or the terminal's weight (checked by the import contracts in pyproject.toml).
"""
