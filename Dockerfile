# The root filesystem of the netplug managed plugin.
#
# `make plugin` builds it: the wheels (netplug's own and its dependencies, for the base image's
# Python) are downloaded on the host into build/wheels, so the build itself needs no network
# (`docker build --network none`). BASE_IMAGE defaults to a public Python image; `make plugin`
# uses a Debian base made with debootstrap unless BASE_IMAGE is given.
#
# The plugin's environment (PYTHONUNBUFFERED, NETPLUG_*) is set in config.json, not here:
# `docker export`, which turns this image into the plugin's rootfs, drops ENV lines.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# libnftables1: netplug loads it with ctypes for its nftables table.
# iptables: the FORWARD accept rules that let traffic past dockerd's DROP policy.
RUN if ! ldconfig -p | grep -q libnftables.so.1 || ! command -v iptables >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libnftables1 iptables \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/netplug/venv \
    && /opt/netplug/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels netplug \
    && /opt/netplug/venv/bin/pip uninstall -y -q pip \
    && rm -rf /tmp/wheels \
    && ln -s /opt/netplug/venv/bin/netplug /usr/local/bin/netplug \
    && /usr/local/bin/netplug version

ENTRYPOINT ["/usr/local/bin/netplug", "serve"]
