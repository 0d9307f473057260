"""Alembic's environment for the carbot schema; there is no alembic.ini, the configuration is built in code.

`carbot.db.migrate(url)` runs it with a connection already open (and locked)
in `config.attributes["connection"]`. A new revision is generated the same way:

    from alembic import command
    from carbot.db import alembic_config
    command.revision(alembic_config("sqlite:///data/carbot.db"), "what changed", autogenerate=True)

then tidied by hand: it must run on SQLite and on PostgreSQL.
"""

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlmodel.sql.sqltypes import AutoString

from carbot.db import SQLModel, make_engine

target_metadata = SQLModel.metadata


def _render_item(type_: str, item: Any, autogen_context: AutogenContext) -> str | bool:
    # Revisions must not import sqlmodel: its AutoString is a plain VARCHAR in the database.
    if type_ == "type" and isinstance(item, AutoString):
        return f"sa.String(length={item.length})" if item.length else "sa.String()"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (`alembic upgrade --sql`)."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _configure(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
