"""redis-servers of a test's own, for the tests that kill or restart one: never the
shared Redis (tests/conftest.py)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from progress_sse.cli.embedded import answers, free_port, redis_server_binary


class RestartableRedis:
    """A redis-server on a free port that a test kills and starts again, on the same
    port and with the same data (the append-only file, fsynced on every write)."""

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        self.directory = directory
        self.persistent = persistent
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(redis_server_binary()),
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory)),
                *("--save", "", "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always"),
                *("--logfile", str(self.directory / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: answers("127.0.0.1", self.port), 20, "the private redis-server to answer", self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


def wait_for(check: Callable[[], Any], timeout: float, what: str, process: Any = None) -> Any:
    """Poll a condition that has nothing to wait on, with a deadline (blocking: for threads)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return result


class SentinelGroup:
    """A master, one replica and one Sentinel watching them (quorum 1, a master is
    down after 1 s without an answer), each a redis-server of the test's own on a
    free port, without persistence. `lag()` stops the replica, so the master takes
    writes it never sees; `fail_over()` then kills the master and lets the replica
    go on: the Sentinel promotes a replica that lags behind."""

    SERVICE = "progress"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.master_port, self.replica_port, self.sentinel_port = free_port(), free_port(), free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def start(self) -> None:
        self._server("master", self.master_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))

        def attached() -> bool:
            info = self._info(self.master_port)
            return info.get("connected_slaves") == 1 and info["slave0"]["state"] == "online"

        wait_for(attached, 20, "the replica to attach")
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 10000\n"
        )
        self._spawn("sentinel", [str(conf), "--sentinel", "--logfile", str(self.directory / "sentinel.log")])
        wait_for(lambda: answers("127.0.0.1", self.sentinel_port), 20, "the Sentinel to answer")
        # It learns of the replica from the master's INFO, which it asks at once.
        wait_for(lambda: self._sentinel("replicas", self.SERVICE), 20, "the Sentinel to know the replica")

    def master(self) -> int:
        _, port = self._sentinel("get-master-addr-by-name", self.SERVICE)
        return int(port)

    def lag(self) -> None:
        """Stop the replica, and have the master drop its link: what the master sends
        now would otherwise wait in the replica's socket and reach it after all."""
        self.processes["replica"].send_signal(signal.SIGSTOP)
        with redis.Redis(port=self.master_port, socket_timeout=2) as master:
            master.client_kill_filter(_type="replica")

    def fail_over(self) -> None:
        """Kill the master, let the replica run again, and wait until the Sentinel
        has made it the master."""
        self.processes["master"].send_signal(signal.SIGKILL)
        self.processes["master"].wait(10)
        self.processes["replica"].send_signal(signal.SIGCONT)
        wait_for(lambda: self.master() == self.replica_port, 60, "the Sentinel to promote the replica")
        wait_for(lambda: self._info(self.replica_port)["role"] == "master", 30, "the replica to take the role")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(10)

    def _server(self, name: str, port: int, *extra: str) -> None:
        self._spawn(
            name,
            [
                *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.directory)),
                *("--save", "", "--appendonly", "no", "--dbfilename", f"{name}.rdb"),
                *("--logfile", str(self.directory / f"{name}.log"), *extra),
            ],
        )
        wait_for(lambda: answers("127.0.0.1", port), 20, f"the {name} to answer", self.processes[name])

    def _spawn(self, name: str, arguments: list[str]) -> None:
        self.processes[name] = subprocess.Popen(
            [str(redis_server_binary()), *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _info(self, port: int) -> dict[str, Any]:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
            info: dict[str, Any] = client.info("replication")
            return info

    def _sentinel(self, *command: str) -> Any:
        with redis.Redis(port=self.sentinel_port, decode_responses=True, socket_timeout=2) as client:
            return client.execute_command("SENTINEL", *command)


class LocalCluster:
    """A Redis Cluster of six redis-servers of the test run's own (three masters,
    each with a replica), on free ports, without persistence. `fail_over(slot)`
    promotes the replica of the master that serves `slot`, as an operator's
    `CLUSTER FAILOVER` does."""

    def __init__(self, directory: Path, size: int = 6) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ports = [_cluster_port() for _ in range(size)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])

    def start(self) -> None:
        for port in self.ports:
            node = self.directory / str(port)
            node.mkdir(exist_ok=True)
            self.processes[port] = subprocess.Popen(
                [
                    redis7_server(),
                    *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(node)),
                    *("--save", "", "--appendonly", "no", "--cluster-enabled", "yes"),
                    *("--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "2000"),
                    *("--logfile", str(node / "redis.log")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in self.ports:
            wait_for(lambda port=port: answers("127.0.0.1", port), 20, f"cluster node {port}", self.processes[port])
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stdout.decode()[-2000:] + created.stderr.decode()[-2000:]
        wait_for(self._settled, 30, "the cluster to settle")

    def _settled(self) -> bool:
        for port in self.ports:
            with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as node:
                info = node.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
                roles = node.info("replication")
                if roles["role"] == "slave" and roles.get("master_link_status") != "up":
                    return False
        return True

    def is_master(self, port: int) -> bool:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as node:
            return bool(node.info("replication")["role"] == "master")

    def owner(self, slot: int) -> int:
        """The port of the master that serves `slot`."""
        with redis.Redis(port=self.ports[0], decode_responses=True, socket_timeout=2) as node:
            for start, end, master, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master serves slot {slot}")

    def fail_over(self, slot: int) -> int:
        """Promote the replica of `slot`'s master; the new master's port."""
        master = self.owner(slot)
        with redis.Redis(port=master, decode_responses=True, socket_timeout=2) as node:
            master_id = node.execute_command("CLUSTER", "MYID")
        replica = next(port for port in self.ports if self._replica_of(port, master_id))
        with redis.Redis(port=replica, decode_responses=True, socket_timeout=2) as node:
            node.execute_command("CLUSTER", "FAILOVER")
        wait_for(lambda: self.owner(slot) == replica, 30, "the replica to take the slot over")
        wait_for(self._settled, 30, "the cluster to settle after the failover")
        return replica

    def _replica_of(self, port: int, master_id: str) -> bool:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as node:
            _, _, flags, master, *_ = _own_line(node).split()
            return "slave" in flags and master == master_id

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _own_line(node: redis.Redis) -> str:
    return next(line for line in node.execute_command("CLUSTER", "NODES").splitlines() if "myself" in line)


def redis7_server() -> str:
    """A redis-server of Redis 7 or later (sharded pub/sub): the system's, which CI
    installs (.ci/run); the embedded extra's is older."""
    found = shutil.which("redis-server")
    assert found, "no redis-server on PATH: install Redis 7 (Debian: apt-get install redis-server)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
    major = int(version.split("v=", 1)[1].split(".", 1)[0])
    assert major >= 7, f"{found} is Redis {major}: a cluster with sharded pub/sub needs Redis 7"
    return found


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above) is free and valid too."""
    while True:
        port = free_port()
        if port > 55_535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
