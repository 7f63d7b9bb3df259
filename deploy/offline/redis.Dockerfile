# A stand-in for the official redis image, made from Debian's packages where no image registry can be
# reached: redis-server on port 6379, data in /data, reachable from the compose network without a password
# (as the official image's default).
ARG BASE_IMAGE=amlrun-base:py3.11
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
