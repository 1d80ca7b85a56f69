# syntax=docker/dockerfile:1
# Fairgate: compile the native modules in a builder, run on a slim image as a
# non-root user. The policy is mounted at /etc/fairgate/policy.yaml; secrets
# come from the environment, e.g. for the default policy:
#   docker run -e FAIRGATE_JWT_SECRET=... -e FAIRGATE_AUDIT_KEY=... \
#     -v $PWD/policy.yaml:/etc/fairgate/policy.yaml:ro -p 8080:8080 fairgate
# The audit trail (file://var/audit) lands in /var/lib/fairgate/var/audit:
# mount a volume there to keep it.

FROM python:3.11-slim AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ./ext
COPY gateway ./gateway
COPY policies ./policies
RUN pip install --no-cache-dir --upgrade pip wheel \
 && pip wheel --no-cache-dir --wheel-dir /wheels '.[redis]'

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system fairgate \
 && useradd --system --gid fairgate --home-dir /var/lib/fairgate --create-home fairgate
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'fairgate[redis]' \
 && rm -rf /wheels
COPY policies/default.yaml /etc/fairgate/policy.yaml
USER fairgate
WORKDIR /var/lib/fairgate
EXPOSE 8080 9090
# The admin listener answers /healthz; it binds to all interfaces here only
# so the orchestrator can reach it: publish 9090 to the cluster, never publicly.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["fairgate", "run", "--policy", "/etc/fairgate/policy.yaml", "--host", "0.0.0.0", "--port", "8080", "--admin", "0.0.0.0:9090"]
