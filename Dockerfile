# The Airflow image of docker-compose.yaml: the official image plus airflow-amlrun with its Docker and SSH
# targets and S3 stores, the Celery executor, psycopg for the run history and asyncpg for the API server on
# PostgreSQL.
#
#   docker-compose build    (or: docker build -t airflow-amlrun:latest .)
#
# AIRFLOW_BASE_IMAGE names the image to build on: any image shaped like apache/airflow (Airflow installed
# for the user `airflow`, uid 50000, gid 0; AIRFLOW_VERSION set).
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_BASE_IMAGE}

# What the example DAG's training script imports: the local target runs it with the worker's Python.
# Set it empty (--build-arg EXAMPLE_REQUIREMENTS=) for an image without the example's packages.
ARG EXAMPLE_REQUIREMENTS="scikit-learn"

# The store of docker-compose.yaml's shared volume: a named volume takes its owner from the image's folder.
USER root
RUN mkdir -p /srv/amlrun/store /opt/airflow-amlrun \
 && chown -R airflow:0 /srv/amlrun /opt/airflow-amlrun \
 && chmod -R g+rwX /srv/amlrun
USER airflow

# The dependencies first, from pyproject.toml alone (an empty package stands in for the code), so that a
# change of the code reuses this layer. Airflow stays at the base image's version; celery 5.6 and later
# stop the Celery provider at start (`cannot import name 'retry' from 'celery.backends.database'`).
COPY --chown=airflow:0 pyproject.toml hatch_build.py /opt/airflow-amlrun/
RUN cd /opt/airflow-amlrun \
 && mkdir airflow_amlrun && touch airflow_amlrun/__init__.py README.md \
 && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" ".[docker,ssh,postgres,s3]" \
      apache-airflow-providers-celery "celery<5.6" asyncpg ${EXAMPLE_REQUIREMENTS} \
 && pip uninstall --yes airflow-amlrun \
 && rm -rf /opt/airflow-amlrun/*

# The package with the UI's bundle built (`make install` builds it; hatch_build.py stops the build without it).
COPY --chown=airflow:0 pyproject.toml hatch_build.py README.md /opt/airflow-amlrun/
COPY --chown=airflow:0 airflow_amlrun /opt/airflow-amlrun/airflow_amlrun
RUN pip install --no-cache-dir --no-deps /opt/airflow-amlrun && rm -rf /opt/airflow-amlrun/*
