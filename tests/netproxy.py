"""A TCP proxy in front of the tests' Redis that can go silent: a network that dies without closing anything.

The tests' Redis listens on a Unix socket (`carbot.services.PrivateRedis`). `BlackholeProxy`
accepts TCP on 127.0.0.1 and forwards each connection to that socket, in a thread with its
own event loop, so synchronous tests and other processes can use it. `blackhole()` stops
forwarding in both directions without closing a connection or refusing a new one: bytes
sent meanwhile are held, as a partitioned network's TCP retransmissions would hold them,
and `restore()` delivers them and forwards again. A client on such a connection hears
nothing at all: only its own timeouts can tell it the network is gone. (TCP keepalive cannot
notice it either: the proxy's end of each connection is alive and acknowledges probes.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class BlackholeProxy:
    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.accepted = 0  # connections accepted so far: a client that reconnects shows here
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blackhole-proxy", daemon=True)
        self._forwarding: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> BlackholeProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    async def _serve(self) -> None:
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.unix_path)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pump(client_reader, upstream_writer), self._pump(upstream_reader, client_writer),
            return_exceptions=True,
        )  # fmt: skip
        for writer in (client_writer, upstream_writer):
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._forwarding is not None
        while True:
            await self._forwarding.wait()  # held here while the network is "down": nothing read, nothing sent
            data = await reader.read(65536)
            await self._forwarding.wait()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    def blackhole(self) -> None:
        """Stop forwarding, in both directions, on every connection, old and new; close nothing."""
        assert self._forwarding is not None
        self._loop.call_soon_threadsafe(self._forwarding.clear)

    def restore(self) -> None:
        """Forward again (what was held is delivered)."""
        assert self._forwarding is not None
        self._loop.call_soon_threadsafe(self._forwarding.set)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BlackholeProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
