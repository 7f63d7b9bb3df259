# An image shaped like apache/airflow, made from Debian's packages and PyPI, where no image registry can be
# reached (this project's machines): user `airflow` (uid 50000, gid 0), AIRFLOW_HOME=/opt/airflow,
# AIRFLOW_VERSION set, `airflow` behind dumb-init as the entrypoint, curl for the health checks. The
# repository's Dockerfile builds on it as it does on the official image (AIRFLOW_BASE_IMAGE).
ARG BASE_IMAGE=amlrun-base:py3.11
FROM ${BASE_IMAGE}
ARG AIRFLOW_VERSION=3.3.2

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl dumb-init openssh-client \
 && rm -rf /var/lib/apt/lists/*

# The registries may sit behind a TLS proxy: the build context brings the CA bundle that trusts it.
COPY ca-certificates.crt /usr/local/share/amlrun/ca-certificates.crt
ENV PIP_CERT=/usr/local/share/amlrun/ca-certificates.crt \
    SSL_CERT_FILE=/usr/local/share/amlrun/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/usr/local/share/amlrun/ca-certificates.crt

RUN useradd --uid 50000 --gid 0 --home-dir /home/airflow --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/airflow/config /opt/airflow/plugins \
 && chown -R airflow:0 /opt/airflow && chmod -R g+rwX /opt/airflow
USER airflow
ENV AIRFLOW_HOME=/opt/airflow AIRFLOW_VERSION=${AIRFLOW_VERSION} PATH=/home/airflow/venv/bin:${PATH}
RUN python3 -m venv /home/airflow/venv \
 && pip install --no-cache-dir --quiet uv \
 && uv pip install --no-cache --compile-bytecode --python /home/airflow/venv/bin/python \
      "apache-airflow[celery,postgres]==${AIRFLOW_VERSION}" asyncpg "celery<5.6"
WORKDIR /opt/airflow
ENTRYPOINT ["/usr/bin/dumb-init", "--", "airflow"]
CMD ["version"]
