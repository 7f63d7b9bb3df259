"""Tables of the run history: experiments, runs, their metrics, registered environments and models.

SQLAlchemy Core tables on one MetaData, which Alembic's migrations are checked against. No ORM: a process
that submits a run without Airflow (a plain script, the CLI) imports this to record one run, and the ORM's
import and mapping cost more than the rest of its start-up (``benchmarks/overhead.py --targets plain``). An
Airflow task imports the ORM anyway, for Airflow's own models; it is spared only the mapping of these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Columns of a run the list may be sorted by that get an index of their own (created_at has one below).
SORTED_COLUMNS = ("status", "target", "start_time", "end_time", "dag_id", "task_id")

metadata = MetaData()

experiments = Table(
    "amlrun_experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

runs = Table(
    "amlrun_runs",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("experiment_id", Integer, ForeignKey("amlrun_experiments.id"), nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("target", String(256), nullable=False),
    Column("script", String(1024)),
    Column("command", Text),
    Column("arguments", JSON, nullable=False, default=list),
    Column("environment", JSON),
    Column("snapshot_id", String(64)),
    Column("git", JSON),
    Column("tags", JSON, nullable=False, default=dict),
    Column("handle", JSON),
    Column("outputs_uri", String(1024)),
    Column("logs_uri", String(1024)),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("start_time", DateTime(timezone=True)),
    Column("end_time", DateTime(timezone=True)),
    Column("dag_id", String(250)),
    Column("task_id", String(250)),
    Column("airflow_run_id", String(250)),
    Column("map_index", Integer),
    Column("try_number", Integer),
    # When the task following the run last reported in; a run nobody reports on may be settled (reconcile).
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("max_run_duration_seconds", Float),
    # The ScriptRunConfig as submitted (no secrets; the environment as the exact version it resolved to), which
    # a re-run submits again; None for runs recorded before it was kept.
    Column("config", JSON),
    # The run this one re-runs (`amlrun rerun`).
    Column("rerun_of", String(128), index=True),
    # The sweep (HyperDrive parent run) this run is a child of.
    Column("parent_run_id", String(128), index=True),
    # What its users call the run and say of it (``run.display_name``, ``run.description``).
    Column("display_name", String(256)),
    Column("description", Text),
    Index("ix_amlrun_runs_airflow_task", "dag_id", "task_id", "airflow_run_id", "map_index"),
    # The run list's default order (newest first, the id breaking ties) and its keyset cursor.
    Index("ix_amlrun_runs_created", "created_at", "id"),
    # An experiment's runs, newest first (SQLite walks it for the list filtered by experiment).
    Index("ix_amlrun_runs_experiment_created", "experiment_id", "created_at", "id"),
    # The experiments' run counts and last activity, of the DAGs a reader may see, from the index alone.
    Index("ix_amlrun_runs_experiment_dag_created", "experiment_id", "dag_id", "created_at"),
    # The list sorted by one of these columns: each walks its index, with the id breaking ties.
    *(Index(f"ix_amlrun_runs_{c}_id", c, "id") for c in SORTED_COLUMNS),
)

metric_points = Table(
    "amlrun_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("amlrun_runs.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(256), nullable=False),
    # Steps count samples or tokens as often as epochs: 64-bit (a 32-bit step overflows at 2**31).
    Column("step", BigInteger),
    Column("value", Float),
    # A logged value that is not a number (a string, a list) keeps its JSON text here.
    Column("value_json", Text),
    Column("logged_at", DateTime(timezone=True), nullable=False),
    Column("seq", Integer, nullable=False),
    Index("ix_amlrun_metrics_run_name", "run_id", "name"),
    UniqueConstraint("run_id", "seq", name="uq_amlrun_metrics_run_seq"),
)

# One metric of one run in brief: its latest value (by seq), how many points it has, its extremes. Kept up to
# date as points are stored, so the run list shows, filters and sorts by metrics without reading the points.
metric_summaries = Table(
    "amlrun_metric_summaries",
    metadata,
    Column("run_id", String(128), ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(256), primary_key=True),
    # Points stored, and how many of them are finite numbers (the charted ones, counted by the pyramid).
    Column("count", BigInteger, nullable=False),
    Column("numeric_count", BigInteger, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("last_step", BigInteger),
    Column("last_value", Float),
    Column("last_value_json", Text),
    Column("min_value", Float),
    Column("max_value", Float),
    # Runs sorted or filtered by one metric's latest value.
    Index("ix_amlrun_metric_summaries_name_value", "name", "last_value", "run_id"),
)

# A bucket of a metric's min/max pyramid: the extremes of `size` consecutive finite points.
#
# Level L's buckets hold ``series.BUCKET_SIZES[L]`` points each; bucket b covers the points numbered
# b*size .. (b+1)*size-1 in the order they were stored. A chart of a long series reads one level's few
# thousand buckets instead of its points, and every spike is in some bucket's minimum or maximum. Only a
# metric of more than ``series.READ_LIMIT`` finite points has a pyramid: a chart reads shorter ones whole.
metric_buckets = Table(
    "amlrun_metric_buckets",
    metadata,
    Column("run_id", String(128), ForeignKey("amlrun_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("bucket", BigInteger, primary_key=True, autoincrement=False),
    Column("count", Integer, nullable=False),
    # Where the extremes lie on the chart's x axis: the point's step, or its number when it has none.
    Column("min_x", BigInteger, nullable=False),
    Column("min_value", Float, nullable=False),
    Column("max_x", BigInteger, nullable=False),
    Column("max_value", Float, nullable=False),
    # Which of the two came first, to draw them in order.
    Column("min_first", Boolean, nullable=False),
)

# Registered environments (airflow_amlrun.environment.registry): one row a version of a name.
environments = Table(
    "amlrun_environments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("version", String(32), nullable=False),
    # Versions are numbered 1, 2, ...; the number orders them (the string "10" sorts before "9").
    Column("seq", Integer, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("lock", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "version", name="uq_amlrun_environments_name_version"),
    UniqueConstraint("name", "seq", name="uq_amlrun_environments_name_seq"),
    # One version per distinct spec: registering an identical spec returns that version.
    UniqueConstraint("name", "spec_hash", name="uq_amlrun_environments_name_hash"),
)

environment_labels = Table(
    "amlrun_environment_labels",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("label", String(64), primary_key=True),
    Column("version", String(32), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Registered models (airflow_amlrun.history.model_registry): one row a version of a name.
models = Table(
    "amlrun_models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_id", String(128), nullable=False, index=True),
    # The path in the run's outputs the model was registered from, as given ("outputs/model.pkl").
    Column("path", String(1024), nullable=False),
    # The manifest of its files in the workspace store, content-addressed as code snapshots are.
    Column("snapshot_id", String(64), nullable=False),
    Column("tags", JSON, nullable=False, default=dict),
    Column("properties", JSON, nullable=False, default=dict),
    # What the run was when the model was registered: experiment, target, metrics, code snapshot,
    # environment, git.
    Column("run_info", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "version", name="uq_amlrun_models_name_version"),
)

model_labels = Table(
    "amlrun_model_labels",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("label", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
