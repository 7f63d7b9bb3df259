# A stand-in for the official postgres image, made from Debian's packages where no image registry can be
# reached: the same variables (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB), data folder and port. The
# cluster Debian's package makes is dropped: the entrypoint makes its own, and Debian's pg_isready would ask
# the dropped one's port (5433 when the build's host already serves 5432).
ARG BASE_IMAGE=amlrun-base:py3.11
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && pg_dropcluster "$(ls /usr/lib/postgresql)" main \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
 && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
