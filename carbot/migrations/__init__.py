"""Alembic migrations of the carbot schema (a package so that they ship inside the wheel)."""
