"""Celery workers (re-ranking and bulk embedding) arrive with the re-ranking issue."""
