"""Replicas of the real image behind real HAProxy (deploy/), under load and under faults.

deploy/docker-compose.yml runs 3 replicas of the session's image (the tiny model) and the
balancer; steady concurrent load (streaming and not) goes through the balancer while a
replica is SIGKILLed, and while each replica in turn gets SIGTERM. Needs a Docker engine and
docker-compose, which scripts/docker_standin.sh installs (as root on Debian); skips without
them, except in CI.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import free_port
from tests.dockerized import ROOT, sh, wait_until

pytestmark = pytest.mark.timeout(2400)
COMPOSE_FILE = str(ROOT / "deploy" / "docker-compose.yml")
REPLICAS = 3
NEW_TOKENS = 16  # every request generates exactly this many (min_new_tokens)
CLIENTS = 6  # concurrent clients: two running on each replica at a time
_ID = re.compile(r" id=(\S+) ")
FAILURE_BOUND_S = 30  # a request cut by a kill must end within this (no hang)


@dataclass
class Cluster:
    project: str
    url: str
    stats_url: str
    env: dict[str, str]

    def compose(self, *args: str) -> str:
        return sh("docker-compose", "-f", COMPOSE_FILE, "-p", self.project, *args, env=self.env)

    def balancer(self) -> str:
        """The balancer's container id (Compose 1 names it project_balancer_1, 2 with '-')."""
        return self.compose("ps", "-q", "balancer").strip()

    def replicas(self) -> list[str]:
        """Container ids of the textgen service (running or not)."""
        return self.compose("ps", "-q", "textgen").split()

    def servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of the backend: server name -> its stats row (status, addr, ...)."""
        text = httpx.get(f"{self.stats_url}/stats;csv", timeout=5).text.removeprefix("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["addr"]}

    def up_servers(self) -> dict[str, str]:
        """Server name -> replica IP, for the servers HAProxy has UP."""
        return {
            name: row["addr"].split(":")[0]
            for name, row in self.servers().items()
            if row["status"] == "UP"
        }

    def balancer_log(self) -> str:
        """HAProxy's request log, whole: its ring, read on its CLI, which listens on the
        balancer container's loopback only (deploy/haproxy/haproxy.cfg): from inside it."""
        read = 'exec 3<>/dev/tcp/127.0.0.1/9999; echo "show events requests" >&3; cat <&3'
        out = subprocess.run(
            ["docker", "exec", self.balancer(), "bash", "-c", read], capture_output=True, timeout=60
        )
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        return out.stdout.decode(errors="replace")


def ip_of(cid: str) -> str:
    return sh(
        "docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid
    ).strip()


def restart_count(cid: str) -> int:
    return int(sh("docker", "inspect", "-f", "{{.RestartCount}}", cid))


def started_at(cid: str) -> str:
    return sh("docker", "inspect", "-f", "{{.State.StartedAt}}", cid).strip()


def crash(cid: str) -> None:
    """SIGKILL to the replica's main process, from the host, as the OOM killer sends it.

    Not `docker kill`: Docker counts a container it killed itself as stopped by hand,
    and its restart policy then leaves it down. When a container's PID 1 dies, the
    kernel kills every other process in it.
    """
    os.kill(int(sh("docker", "inspect", "-f", "{{.State.Pid}}", cid)), signal.SIGKILL)


def served_requests(ip: str) -> float:
    """The replica's own count of finished generations (`textgen_requests_total`)."""
    text = httpx.get(f"http://{ip}:3000/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("textgen_requests_total{")
    )


@pytest.fixture(scope="module")
def compose_cli(docker_engine) -> str:
    """docker-compose, which the engine's set-up installs; a skip saying why not (never in CI)."""
    found = shutil.which("docker-compose")
    if found is None and not os.environ.get("CI"):
        pytest.skip(
            "docker-compose is missing and scripts/docker_standin.sh could not install it "
            "(needs root on Debian)"
        )
    assert found is not None, "docker-compose is missing after scripts/docker_standin.sh"
    return found


@pytest.fixture(scope="module")
def cluster(compose_cli, image, tmp_path_factory):
    image_tag, _, _ = image
    project = f"textgentest{os.getpid()}"
    port, stats_port = free_port(), free_port()
    env = {
        "TEXTGEN_IMAGE": image_tag,
        "TEXTGEN_BALANCER_IMAGE": f"{project}-balancer:test",
        "TEXTGEN_REPLICAS": str(REPLICAS),
        "TEXTGEN_PORT": str(port),
        "TEXTGEN_STATS_PORT": str(stats_port),
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_MAX_BATCH_SIZE": "8",
        "OMP_NUM_THREADS": "1",  # three replicas on this machine's cores
    }
    c = Cluster(project, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}", env)
    started = time.monotonic()
    try:
        c.compose("up", "-d", "--build")
        wait_until(lambda: _all_up(c), 300, "3 replicas UP in HAProxy")
        print(f"cluster up {time.monotonic() - started:.0f}s after `docker-compose up`")
        yield c
    finally:
        try:  # the balancer's log, kept for a failure's post-mortem, when it ever started
            logs = subprocess.run(["docker", "logs", c.balancer()], capture_output=True, text=True)
            kept = logs.stdout + logs.stderr
        except AssertionError as error:
            kept = f"no balancer: {error}"
        (tmp_path_factory.mktemp("cluster") / "balancer.log").write_text(kept)
        subprocess.run(
            ["docker-compose", "-f", COMPOSE_FILE, "-p", project, "down", "-t", "1"],
            env={**os.environ, **env},
            capture_output=True,
        )
        subprocess.run(
            ["docker", "image", "rm", "-f", env["TEXTGEN_BALANCER_IMAGE"]], capture_output=True
        )


@dataclass
class Outcome:
    request_id: str
    streaming: bool
    started: float
    ended: float = 0.0
    error: str | None = None  # None: the whole answer came back


@dataclass
class Load:
    """CLIENTS threads sending requests through the balancer, streaming and not, in turn."""

    url: str
    name: str  # prefixes the X-Request-Ids: unique across the tests on one balancer log
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    ids: itertools.count = field(default_factory=itertools.count)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def finished(self) -> int:
        return sum(1 for o in list(self.outcomes) if o.ended)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(120, connect=10)) as client:
            while not self.stop.is_set():
                n = next(self.ids)
                outcome = Outcome(f"{self.name}-{n}", n % 2 == 1, time.monotonic())
                self.outcomes.append(outcome)
                try:
                    outcome.error = self._one(client, outcome)
                except httpx.HTTPError as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                outcome.ended = time.monotonic()

    @staticmethod
    def _one(client: httpx.Client, outcome: Outcome) -> str | None:
        body = {"prompt": "Hello", "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        headers = {"X-Request-Id": outcome.request_id}
        if not outcome.streaming:
            r = client.post("/generate", json=body, headers=headers)
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            done = r.json()["usage"]["completion_tokens"] == NEW_TOKENS
            return None if done else f"short answer: {r.text}"
        with client.stream("POST", "/generate_stream", json=body, headers=headers) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        final = events[-1] if events else {}
        if final.get("usage", {}).get("completion_tokens") != NEW_TOKENS:
            return f"stream ended without its final event: {final}"
        return None


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "requests": len(outcomes),
        "streaming": sum(o.streaming for o in outcomes),
        "failed": sum(o.error is not None for o in outcomes),
    }


def test_traffic_spreads_over_the_replicas_and_metrics_are_reachable(cluster):
    servers = cluster.up_servers()
    before = {name: served_requests(ip) for name, ip in servers.items()}
    with Load(cluster.url, "spread") as load:
        wait_until(lambda: load.finished() >= 60, 300, "60 requests through the balancer")
    counts = summary(load.outcomes)
    served = {name: served_requests(ip) - before[name] for name, ip in servers.items()}
    print(f"spread: {counts}; served per replica (their /metrics): {served}")
    assert counts["failed"] == 0, [o for o in load.outcomes if o.error]
    assert sum(served.values()) == counts["requests"]
    for name, n in served.items():
        assert n >= counts["requests"] / (3 * REPLICAS), f"{name} served {n} of {served}"
    # The balancer's own view: the stats page and its Prometheus metrics.
    stats = httpx.get(f"{cluster.stats_url}/stats", timeout=5)
    assert stats.status_code == 200 and "replicas" in stats.text
    metrics = httpx.get(f"{cluster.stats_url}/metrics", timeout=5).text
    for name in servers:
        assert f'haproxy_server_status{{proxy="replicas",server="{name}",state="UP"}} 1' in metrics


def test_a_replica_killed_mid_load_costs_only_its_running_requests(cluster):
    with Load(cluster.url, "kill") as load:
        wait_until(lambda: load.finished() >= 12, 300, "load under way")
        busy: list[str] = []
        wait_until(
            lambda: (
                busy.extend(n for n, r in cluster.servers().items() if int(r["scur"]) >= 1) or busy
            ),
            60,
            "requests running on a replica",
            every_s=0.1,
        )
        victim_server = busy[0]
        victim_ip = cluster.up_servers()[victim_server]
        (victim,) = [c for c in cluster.replicas() if ip_of(c) == victim_ip]
        restarts = restart_count(victim)
        killed_at = time.monotonic()
        crash(victim)  # SIGKILL: no drain, no goodbye
        # Docker restarts a container once all of it has died: the kill is over then.
        wait_until(lambda: restart_count(victim) > restarts, 60, "a restart", every_s=0.05)
        dead_at = time.monotonic()
        wait_until(
            lambda: victim_ip not in cluster.up_servers().values(), 30, "the victim taken out"
        )
        wait_until(
            lambda: ip_of(victim) in cluster.up_servers().values(), 300, "the victim UP again"
        )
        back_at, back_ip = time.monotonic(), ip_of(victim)
        baseline = served_requests(back_ip)
        wait_until(lambda: served_requests(back_ip) >= baseline + 3, 120, "traffic on the victim")
    outcomes = load.outcomes
    # Which replica each request ended on, from the balancer's log (by X-Request-Id).
    lines = _lines_by_request_id(cluster.balancer_log())
    on_victim = {
        o.request_id
        for o in outcomes
        if f" replicas/{victim_server} " in lines.get(o.request_id, "")
    }
    # The kill takes time: SIGKILL reaches the container's first process at `killed_at`;
    # its workers go with the PID namespace, and until they have (0.2-0.4 s here) the
    # victim still accepts requests and starts answering them. So "running on the killed
    # replica" is every request that was in flight on it during [killed_at, dead_at], and
    # "sent after the kill" is every request sent once it is dead: those must all succeed.
    # A request cut by the kill before any response byte sometimes leaves no log line (the
    # client sees its connection closed): HAProxy cannot say where it ran. Such a request
    # counts as running on the killed replica only when it was in flight in that window.
    unlogged = {o.request_id for o in outcomes if o.request_id not in lines}
    across_kill = [o for o in outcomes if o.started < dead_at and o.ended > killed_at]
    running = [o for o in across_kill if o.request_id in on_victim | unlogged]
    failed = [o for o in outcomes if o.error is not None]
    after = [o for o in outcomes if o.started > dead_at]
    print(
        f"kill: requests {len(outcomes)}, failed {len(failed)}, running on the killed replica "
        f"{len(running)} (of which without a log line: {len(unlogged & set(map(_id, running)))}), "
        f"sent after the kill {len(after)}; dead after {dead_at - killed_at:.2f}s, "
        f"back in {back_at - killed_at:.0f}s"
    )
    for o in failed:
        print(
            f"  failed {o.request_id} (stream={o.streaming}, sent {o.started - killed_at:+.3f}s, "
            f"ended {o.ended - killed_at:+.3f}s from the kill): {o.error}; "
            f"log: {lines.get(o.request_id, 'none')!r}"
        )
    assert unlogged <= {o.request_id for o in failed}  # every completed request was logged
    assert len(running) >= 1
    assert {o.request_id for o in failed} <= {o.request_id for o in running}
    assert all(o.ended - killed_at < FAILURE_BOUND_S for o in failed)
    assert all(o.error is None for o in after), [o for o in after if o.error]


def _id(outcome: Outcome) -> str:
    return outcome.request_id


def _lines_by_request_id(log: str) -> dict[str, str]:
    """HAProxy's log lines by the X-Request-Id they carry (`id=...`)."""
    return {m.group(1): line for line in log.splitlines() if (m := _ID.search(line))}


def test_rolling_restart_under_load_fails_no_request(cluster):
    with Load(cluster.url, "rolling") as load:
        wait_until(lambda: load.finished() >= 12, 300, "load under way")
        for cid in cluster.replicas():
            before = started_at(cid)
            # SIGTERM, up to 60 s to drain and exit, then a fresh start.
            sh("docker", "restart", "-t", "60", cid)
            assert started_at(cid) != before
            wait_until(lambda: len(cluster.up_servers()) == REPLICAS, 300, "all replicas UP again")
        finished = load.finished()
        wait_until(lambda: load.finished() >= finished + 6, 120, "load after the last restart")
    counts = summary(load.outcomes)
    print(f"rolling restart: {counts}")
    assert counts["failed"] == 0, [o for o in load.outcomes if o.error]
    for cid in cluster.replicas():  # each drained: readiness first, then the listener
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
        assert "SIGTERM: draining" in logs.stderr + logs.stdout
        assert "drain period over" in logs.stderr + logs.stdout


def _all_up(cluster: Cluster) -> bool:
    try:
        return len(cluster.up_servers()) == REPLICAS
    except httpx.HTTPError:
        return False  # the balancer is starting


def _busy(row: dict[str, str]) -> bool:
    return row["status"] == "UP" and int(row["scur"]) >= 1
