"""Celery workers: bulk embedding and re-ranking. Start with `celery -A workers.celery_app worker` (see there)."""
