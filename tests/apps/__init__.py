"""Apps as users have them, for the integration tests: an existing Celery app with
progress-sse added (`shop`), and a web process that only publishes tasks
(`publisher_only`)."""
