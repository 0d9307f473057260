"""One small HTTP endpoint per process: Prometheus metrics, liveness and readiness.

- `GET /metrics`: the process's registry (`carbot.metrics`) in Prometheus' text format.
- `GET /healthz`: 200 while the process runs. An orchestrator restarts a process that stops answering.
- `GET /readyz`: 200 when every check passes, else 503; the body is JSON naming each check and
  what went wrong. A worker is ready when Redis answers and its model is loaded; a bot or the
  train worker when Redis and the database answer. Not ready is not dead: a worker waits for
  Redis to come back on its own.

It runs in a daemon thread beside the process's real work (`ThreadingHTTPServer`, so a slow check
never blocks a scrape) and only when `CARBOT_METRICS_PORT` is set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from carbot import metrics
from carbot.connections import redis_connection
from carbot.settings import Settings, normalize_database_url

log = logging.getLogger(__name__)

# A check raises to say "not ready"; its message is what the operator reads in the /readyz body.
Check = Callable[[], object]

# Probes come every few seconds: a check waits this long at most for Redis or the database.
CHECK_TIMEOUT_S = 2.0


class HealthServer:
    """Serves /metrics, /healthz and /readyz on `host:port` (port 0: any free port) from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, checks: Mapping[str, Check], *, host: str, port: int) -> None:
        self.registry = registry
        self.checks = dict(checks)
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.health = self  # type: ignore[attr-defined]  # how a request reaches its server's state
        # A short poll interval: stopping the server (at exit, in tests) waits at most this long.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.1)
        self._thread = threading.Thread(target=serve, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Run every check: whether all passed, and each check's result ("ok" or what went wrong)."""
        results = {}
        for name, check in self.checks.items():
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # any failure of a check means "not ready", never a crashed endpoint
                results[name] = f"{type(exc).__name__}: {exc}"
        return all(result == "ok" for result in results.values()), results


class _Handler(BaseHTTPRequestHandler):
    server_version = "carbot"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        health: HealthServer = self.server.health  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            # Prometheus' own negotiation: the classic text format, or OpenMetrics when the scraper asks for it.
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encode(health.registry))
        elif path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        elif path == "/readyz":
            ready, results = health.readiness()
            body = json.dumps({"ready": ready, "checks": results}).encode()
            self._send(200 if ready else 503, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        # A probe every few seconds would drown the logs; keep them for debugging.
        log.debug("%s %s", self.address_string(), format % args)


@contextlib.contextmanager
def serving(settings: Settings, registry: CollectorRegistry, checks: Mapping[str, Check]) -> Iterator[None]:
    """Serve the endpoint for the duration of the block, if `CARBOT_METRICS_PORT` is set."""
    if settings.metrics_port is None:
        yield
        return
    server = HealthServer(registry, checks, host=settings.metrics_listen, port=settings.metrics_port).start()
    log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)", settings.metrics_listen, server.port)
    try:
        yield
    finally:
        server.stop()


# -- checks ------------------------------------------------------------------------------------------------------


def redis_answers(url: str | Callable[[], str | None]) -> Check:
    """Redis at `url` (or at the URL a callable finds at check time) answers a PING."""

    def check() -> None:
        where = url() if callable(url) else url
        if where is None:
            raise ConnectionError("no Redis server is running for this data folder")
        # A fresh connection each time: a pooled one would hide a server that restarted or went away.
        client = redis_connection(where, timeout_s=CHECK_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()

    return check


def database_answers(url: str) -> Check:
    """The database at `url` answers `SELECT 1`."""
    from sqlalchemy import create_engine, text

    from carbot.db import make_engine

    parsed = normalize_database_url(url)
    if parsed.get_backend_name() == "postgresql":
        # Without a connect timeout a check on an unreachable host would hang for minutes.
        engine = create_engine(parsed, connect_args={"connect_timeout": int(CHECK_TIMEOUT_S)}, pool_pre_ping=True)
    else:
        engine = make_engine(url)  # SQLite: the project's settings (connections shared across threads)

    def check() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return check


def model_is_loaded() -> None:
    """This worker process has loaded a model (it answers photos as soon as Redis hands it one)."""
    if metrics.loaded_model_version() is None:
        raise RuntimeError("no model loaded yet")


def worker_checks(redis_url: str) -> dict[str, Check]:
    return {"redis": redis_answers(redis_url), "model": model_is_loaded}


def queue_and_database_checks(settings: Settings) -> dict[str, Check]:
    """A bot's or the train worker's: Redis (`REDIS_URL`, or this data folder's private server) and the database."""
    from carbot import services

    return {
        "redis": redis_answers(lambda: services.running_redis_url(settings)),
        "database": database_answers(settings.sql_url),
    }
