"""A real Docker engine for the end-to-end tests, `make plugin` and `make demo`.

Everything runs in throwaway roots and namespaces:
- dockerd (Debian's docker.io, iptables on, as users run it) in a network namespace of its own,
  with its own `--data-root`, `--exec-root`, API socket and a private `/run/docker/plugins`, so
  nothing it does (bridges, iptables, plugin sockets) touches the host or another dockerd;
- a registry (Debian's docker-registry) on 127.0.0.1 at a random port inside that namespace;
- a busybox image made from busybox-static;
- the plugin, built the way Docker documents it: Dockerfile -> image -> `docker create` +
  `docker export` -> rootfs, `config.json` beside it -> `docker plugin create`, `push`,
  `install`. Without Docker Hub or PyPI inside build containers: the base image is made with
  debootstrap (cached under build/), the wheels are downloaded on the host, and the build runs
  with `--network none`. `BASE_IMAGE=<ref>` uses a registry image instead.

Run as a module for the Makefile: `python -m tests.dockerenv plugin` builds ./plugin.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
DOCKER = "/usr/bin/docker"  # the CLI of Debian's docker.io, the same version as its dockerd
PACKAGES = ("docker.io", "docker-registry", "busybox-static", "debootstrap", "iptables", "curl")
SUITE = "bookworm"
STATE_MOUNT_SOURCE = "/var/lib/docker/plugins/netplug-state"  # config.json's default
BASE_TAG = f"netplug-base:{SUITE}"
# Debian packages the plugin's rootfs needs besides Python.
ROOTFS_PACKAGES = "python3,python3-venv,libnftables1,iptables,ca-certificates"


def log(message: str) -> None:
    print(f"[dockerenv] {message}", file=sys.stderr, flush=True)


def run(
    *cmd: str, check: bool = True, input: str | None = None, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, capture_output=True, text=True, input=input, timeout=timeout, check=False, **kw
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def ensure_packages() -> None:
    missing = [
        p
        for p in PACKAGES
        if "ok installed" not in run("dpkg-query", "-W", "-f=${Status}", p, check=False).stdout
    ]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        run("apt-get", "update", "-qq", timeout=900)
        run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            *missing,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=1800,
        )


def free_port() -> int:
    return random.randint(20000, 45000)


class ExistingEngine:
    """A dockerd the user already runs (DOCKER_HOST), for `make plugin BASE_IMAGE=...`."""

    cli = "docker"

    def __init__(self, host: str) -> None:
        self.host = host

    def docker(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(
            self.cli,
            "-H",
            self.host,
            *args,
            check=check,
            input=input,
            timeout=timeout,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )


class Dockerd:
    """dockerd in its own network namespace and roots."""

    cli = DOCKER

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.netns = f"npdock{os.getpid() % 100000}"
        self.socket = root / "docker.sock"
        self.log_path = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def pid(self) -> int:
        return int((self.root / "docker.pid").read_text())

    def start(self) -> None:
        Path("/run/docker/plugins").mkdir(parents=True, exist_ok=True)
        if not Path(f"/run/netns/{self.netns}").exists():
            run("ip", "netns", "add", self.netns)
            self.ns("ip", "link", "set", "lo", "up")
        self._spawn()

    def _spawn(self) -> None:
        (self.root / "docker.pid").unlink(missing_ok=True)
        # A private mount namespace: a tmpfs on /run/docker/plugins, which dockerd hard-codes,
        # keeps this engine's plugin sockets apart from any other dockerd on the machine.
        script = (
            "mount -t tmpfs tmpfs /run/docker/plugins && exec nsenter --net=/run/netns/"
            f"{self.netns} dockerd --data-root {self.root}/data --exec-root {self.root}/exec "
            f"-H unix://{self.socket} --pidfile {self.root}/docker.pid " + " ".join(self.extra_args)
        )
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "slave", "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited:\n{self.logs()[-3000:]}")
            if self.docker("version", check=False, timeout=5).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not start:\n{self.logs()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self._spawn()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            for line in self.docker("ps", "-aq", check=False, timeout=30).stdout.split():
                self.docker("rm", "-f", line, check=False, timeout=60)
        self.stop()
        # Whatever survived (shims of killed plugins, containerd) lives in our mount namespace
        # or our netns: find the processes by their namespace, never by name.
        ns_inode = _inode(f"/run/netns/{self.netns}")
        for pid in _pids():
            if ns_inode and _inode(f"/proc/{pid}/ns/net") == ns_inode:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        run("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def docker(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(
            DOCKER,
            "-H",
            f"unix://{self.socket}",
            *args,
            check=check,
            input=input,
            timeout=timeout,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )

    def ns(
        self, *cmd: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A command in dockerd's network namespace (as "the host")."""
        return run("nsenter", f"--net=/run/netns/{self.netns}", *cmd, check=check, timeout=timeout)

    def in_engine(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in dockerd's network *and* mount namespace (sees the plugin sockets)."""
        return run("nsenter", "-t", str(self.pid), "-m", "-n", *cmd, check=check, timeout=60)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Registry:
    """Debian's docker-registry on 127.0.0.1 inside dockerd's namespace."""

    def __init__(self, engine: Dockerd) -> None:
        self.engine = engine
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(10):
            root = self.engine.root / "registry"
            root.mkdir(exist_ok=True)
            config = root / "config.yml"
            config.write_text(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {root}/data\nhttp:\n  addr: {self.address}\n"
            )
            with (root / "registry.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    [
                        "nsenter",
                        f"--net=/run/netns/{self.engine.netns}",
                        "docker-registry",
                        "serve",
                        str(config),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                probe = self.engine.ns("curl", "-sf", f"http://{self.address}/v2/", check=False)
                if probe.returncode == 0:
                    return
                time.sleep(0.1)
            self.stop()
            self.port = free_port()
        raise RuntimeError("the registry did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --- images ------------------------------------------------------------------------------


def busybox_image(engine: Dockerd) -> None:
    """`busybox:latest` from Debian's busybox-static (no registry needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "etc").mkdir()
        (root / "tmp").mkdir()
        (root / "www").mkdir()
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        applets = run("/bin/busybox", "--list").stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "www/index.html").write_text("hello from netplug\n")
        tar = run(
            "tar", "-C", str(root), "-cf", str(root / "image.tar"), "--exclude=./image.tar", "."
        )
        del tar
        engine.docker("import", "-c", 'CMD ["sh"]', str(root / "image.tar"), "busybox:latest")


def python_image() -> str:
    """An image with python3 in it (the plugin's base), for test servers busybox cannot be."""
    return os.environ.get("BASE_IMAGE") or BASE_TAG


def base_image(engine: Dockerd | ExistingEngine) -> str:
    """A Debian base with Python for the plugin, made with debootstrap once and cached."""
    given = os.environ.get("BASE_IMAGE")
    if given:
        engine.docker("pull", given)
        return given
    cache = BUILD / f"netplug-base-{SUITE}.tar"
    if not cache.exists():
        BUILD.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log(f"debootstrap {SUITE} (once; cached in {cache})")
            run(
                "debootstrap",
                "--variant=minbase",
                f"--include={ROOTFS_PACKAGES}",
                SUITE,
                str(rootfs),
                _mirror(),
                timeout=1800,
            )
            for junk in (
                "var/cache/apt/archives",
                "var/lib/apt/lists",
                "usr/share/doc",
                "usr/share/man",
                "usr/share/info",
                "usr/share/locale",
                "var/log",
            ):
                target = rootfs / junk
                if target.exists():
                    shutil.rmtree(target)
                    target.mkdir()
            run("tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(cache) + ".part", ".")
            os.replace(str(cache) + ".part", cache)
    engine.docker("import", "-c", 'CMD ["python3"]', str(cache), BASE_TAG)
    return BASE_TAG


def _mirror() -> str:
    """The Debian mirror this machine's apt uses."""
    for path in sorted(Path("/etc/apt").rglob("*")):
        if path.suffix not in {".sources", ".list"} or not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if path.suffix == ".list" and words[:1] == ["deb"]:
                url = next(w for w in words[1:] if "://" in w)
            elif line.startswith("URIs:"):
                url = words[1]
            else:
                continue
            if "security" not in url:
                return url
    return "http://deb.debian.org/debian"


def wheelhouse(engine: Dockerd | ExistingEngine, base: str, dest: Path) -> None:
    """netplug's wheel and its dependencies for the base image's Python, downloaded here."""
    probe = engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        base,
        "python3",
        "-c",
        "import sys,platform;print(f'{sys.version_info[0]}.{sys.version_info[1]}',"
        "platform.machine())",
    ).stdout.split()
    version, machine = probe[0], probe[1]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    platforms = [f"manylinux_2_{n}_{machine}" for n in range(17, 37)]
    platforms += [f"manylinux2014_{machine}", f"manylinux1_{machine}"]
    python = sys.executable
    run(python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(ROOT))
    requirements = _requirements()
    run(
        python,
        "-m",
        "pip",
        "download",
        "-q",
        "-d",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        version,
        "--implementation",
        "cp",
        *[arg for p in platforms for arg in ("--platform", p)],
        "--platform",
        "any",
        *requirements,
        timeout=900,
    )


def _requirements() -> list[str]:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps: list[str] = data["project"]["dependencies"]
    return deps


def build_plugin(engine: Dockerd | ExistingEngine, out: Path = ROOT / "plugin") -> dict[str, float]:
    """Dockerfile -> rootfs + config.json in `out`. Returns timings (seconds)."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    base = base_image(engine)
    timings["base image"] = time.monotonic() - t
    t = time.monotonic()
    wheels = BUILD / "wheels"
    wheelhouse(engine, base, wheels)
    timings["wheelhouse"] = time.monotonic() - t
    t = time.monotonic()
    engine.docker(
        "build",
        "--force-rm",
        "--network",
        "none",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        "netplug-rootfs:build",
        str(ROOT),
        timeout=900,
    )
    timings["docker build"] = time.monotonic() - t
    t = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    (out / "rootfs").mkdir(parents=True)
    cid = engine.docker("create", "netplug-rootfs:build").stdout.strip()
    try:
        with subprocess.Popen(
            [engine.cli, "-H", engine.host, "export", cid], stdout=subprocess.PIPE
        ) as export:
            run("tar", "-x", "-C", str(out / "rootfs"), stdin=export.stdout)
            export.wait(120)
    finally:
        engine.docker("rm", "-f", cid, check=False)
    shutil.copy2(ROOT / "config.json", out / "config.json")
    timings["create + export"] = time.monotonic() - t
    return timings


def install_plugin(
    engine: Dockerd, registry: Registry, plugin_dir: Path, name: str = "netplug"
) -> tuple[str, dict[str, float]]:
    """create, push, rm, install (answering the prompt with y). Returns the reference."""
    ref = f"{registry.address}/{name}:latest"
    timings: dict[str, float] = {}
    t = time.monotonic()
    engine.docker("plugin", "create", ref, str(plugin_dir), timeout=900)
    timings["plugin create"] = time.monotonic() - t
    t = time.monotonic()
    engine.docker("plugin", "push", ref, timeout=600)
    timings["plugin push"] = time.monotonic() - t
    engine.docker("plugin", "rm", "-f", ref)
    state = engine.root / "netplug-state"
    state.mkdir(exist_ok=True)
    t = time.monotonic()
    engine.docker(
        "plugin", "install", "--grant-all-permissions", ref, f"state.source={state}", timeout=900
    )
    timings["plugin install"] = time.monotonic() - t
    return ref, timings


def plugin_id(engine: Dockerd, ref: str) -> str:
    return engine.docker("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip()


def plugin_pid(engine: Dockerd, ref: str) -> int:
    pid = plugin_id(engine, ref)
    state = engine.in_engine(
        "runc", "--root", f"{engine.root}/exec/runtime-runc/plugins.moby", "state", pid
    )
    return int(json.loads(state.stdout)["pid"])


@contextlib.contextmanager
def world(engine: Dockerd) -> Iterator[str]:
    """A namespace that plays "the internet": 10.254.0.2, linked to the engine's namespace,
    where the host's address is 10.254.0.1. It has no route to container subnets, so only
    masqueraded traffic gets answers. Yields the namespace's name."""
    name = f"{engine.netns}w"
    run("ip", "netns", "add", name)
    try:
        engine.ns("ip", "link", "add", "up0", "type", "veth", "peer", "name", "wan0")
        engine.ns("ip", "link", "set", "wan0", "netns", name)
        engine.ns("ip", "addr", "add", "10.254.0.1/24", "dev", "up0")
        engine.ns("ip", "link", "set", "up0", "up")
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", "10.254.0.2/24", "dev", "wan0"),
            ("ip", "link", "set", "wan0", "up"),
        ):
            run("ip", "netns", "exec", name, *cmd)
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def engine_with_registry(root: Path) -> Iterator[tuple[Dockerd, Registry]]:
    engine = Dockerd(root)
    registry = Registry(engine)
    try:
        engine.start()
        registry.start()
        yield engine, registry
    finally:
        registry.stop()
        engine.destroy()


def main(argv: list[str]) -> int:
    if argv[:1] != ["plugin"]:
        print("usage: python -m tests.dockerenv plugin", file=sys.stderr)
        return 2
    ensure_packages()
    if os.environ.get("BASE_IMAGE") and os.environ.get("DOCKER_HOST"):
        # A registry base needs an engine that reaches the registry: the user's own.
        timings = build_plugin(ExistingEngine(os.environ["DOCKER_HOST"]))
    else:
        root = Path(tempfile.mkdtemp(prefix="netplug-build-", dir="/tmp"))
        engine = Dockerd(root)
        try:
            engine.start()
            timings = build_plugin(engine)
        finally:
            engine.destroy()
    size = run("du", "-sh", str(ROOT / "plugin" / "rootfs")).stdout.split()[0]
    for step, seconds in timings.items():
        print(f"{step:>16}: {seconds:6.1f} s")
    print(f"plugin/ ready: config.json + rootfs ({size})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
