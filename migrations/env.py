"""Alembic environment: migrates the connection handed in by ``Store.upgrade``,
or, from the ``alembic`` command line, the store named by ``DBPROV_DATABASE_URL``."""

from alembic import context
from sqlalchemy import create_engine

from service.domain.models import Base
from service.settings import Settings

config = context.config
target_metadata = Base.metadata


def run_migrations(connection) -> None:
    # render_as_batch: SQLite can only alter tables by copying them.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    with create_engine(Settings.from_env().database_url).begin() as conn:
        run_migrations(conn)
