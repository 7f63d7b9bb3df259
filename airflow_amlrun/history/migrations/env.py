"""Alembic environment of the run history; the connection comes from the caller's config attributes."""

from __future__ import annotations

from alembic import context

from airflow_amlrun.history.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table="amlrun_alembic_version",
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
