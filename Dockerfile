# The root filesystem of the netplug managed plugin (first version).
#
# The plugin's environment (PYTHONUNBUFFERED, NETPLUG_*) is set in config.json, not here:
# `docker export`, which turns this image into the plugin's rootfs, drops ENV lines.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# libnftables1: netplug loads it with ctypes for its nftables table.
# iptables: the FORWARD accept rules that let traffic past dockerd's DROP policy.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnftables1 iptables \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/netplug/
COPY netplug/ /src/netplug/netplug/
COPY backends/ /src/netplug/backends/
RUN pip install --no-cache-dir /src/netplug \
    && rm -rf /src \
    && test -x /usr/local/bin/netplug

ENTRYPOINT ["netplug", "serve"]
