"""The schema's revisions, oldest first; Alembic skips this file."""
