"""HostRouter inside an ASGI app served by uvicorn on uvloop: the production setting.

One ``HostRouter`` is created in the app's lifespan startup and closed at its
shutdown; every HTTP request to the app calls loopback upstreams through it.
uvicorn (``loop="uvloop"``) runs in a background thread, while the test's own
client runs on the test's backend (asyncio, uvloop or trio).  Quotas are
checked on the *upstream's* counters, never on the router's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from upstream import Upstream

from hostpool import HostRouter

pytest.importorskip("uvloop")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.anyio

H1, H2 = "127.0.0.1", "127.0.0.2"
QUOTAS = {H1: 3, H2: 2}
#: How long ``/fanout`` makes each upstream take; short, to keep the file fast,
#: but long enough for 30 concurrent callers to pile up behind both quotas.
FANOUT_DELAY_MS = 5
HOLD_KEY = "uvicorn-held"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RouterApp:
    """A raw ASGI app: one HostRouter for the app's lifetime, one route per fan-out.

    ``routes`` maps an app path to the upstream URLs that request calls
    concurrently.  The answer is 200 with JSON: the running loop's module, and
    per upstream call its status and the ``X-Upstream-Addr`` it came from (or
    500 with the error, so a failure shows up in the test's assertion).
    """

    def __init__(self, routes: dict[str, list[str]]) -> None:
        self.routes = routes
        self.router: HostRouter | None = None
        self.router_closed = threading.Event()
        #: Requests the app began handling, per path (written on the app's loop).
        self.started: dict[str, int] = dict.fromkeys(routes, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                router = HostRouter(quotas=QUOTAS, timeout=httpx.Timeout(10.0))
                await router.__aenter__()
                self.router = router
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.router is not None:
                    await self.router.__aexit__(None, None, None)
                    if self.router.is_closed:
                        self.router_closed.set()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        urls = self.routes.get(scope["path"])
        if urls is None:
            await self.answer(send, 404, {"error": "no such route"})
            return
        self.started[scope["path"]] += 1
        assert self.router is not None
        try:
            responses = await asyncio.gather(*(self.router.get(url) for url in urls))
        except Exception as exc:
            await self.answer(send, 500, {"error": repr(exc)})
            return
        await self.answer(
            send,
            200,
            {
                "loop": type(asyncio.get_running_loop()).__module__,
                "calls": [[r.status_code, r.headers["x-upstream-addr"]] for r in responses],
            },
        )

    @staticmethod
    async def answer(send: Send, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class UvicornThread:
    """uvicorn serving ``app`` on uvloop in a background thread."""

    START_TIMEOUT = 10.0
    STOP_TIMEOUT = 10.0

    def __init__(self, app: RouterApp) -> None:
        self.app = app
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="uvloop",
            lifespan="on",
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="uvicorn-uvloop", daemon=True)
        self.port = 0

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # SystemExit on a failed startup, too
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + self.START_TIMEOUT
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start within {self.START_TIMEOUT}s")
            time.sleep(0.005)
        if not self.server.started:
            raise RuntimeError(f"uvicorn failed to start: {self.errors!r}")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        """Ask uvicorn to exit (lifespan shutdown included) and join; idempotent."""
        self.server.should_exit = True
        self.thread.join(self.STOP_TIMEOUT)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(self.STOP_TIMEOUT)
            raise RuntimeError(f"uvicorn did not stop within {self.STOP_TIMEOUT}s")
        if self.errors:
            raise RuntimeError(f"uvicorn thread failed: {self.errors!r}")

    async def astop(self) -> None:
        await anyio.to_thread.run_sync(self.stop)


@pytest.fixture
def app_server(upstream: Upstream) -> Iterator[UvicornThread]:
    app = RouterApp(
        {
            "/fanout": [
                upstream.url(H1, f"/delay?ms={FANOUT_DELAY_MS}"),
                upstream.url(H2, f"/delay?ms={FANOUT_DELAY_MS}"),
            ],
            "/held": [upstream.url(H1, f"/hold?key={HOLD_KEY}")],
            "/other": [upstream.url(H2, "/delay?ms=2")],
        }
    )
    server = UvicornThread(app)
    server.start()
    try:
        yield server
    finally:
        upstream.release_all()  # never leave uvicorn waiting on a held request
        server.stop()


def loop_of(response: httpx.Response) -> str:
    return str(response.json()["loop"])


def upstream_hosts(response: httpx.Response) -> list[str | None]:
    return [urllib.parse.urlsplit(f"//{addr}").hostname for _, addr in response.json()["calls"]]


async def hammer(url: str, n: int, concurrency: int) -> list[httpx.Response | Exception]:
    """GET ``url`` ``n`` times with ``concurrency`` callers; every outcome, in no order."""
    results: list[httpx.Response | Exception] = []
    remaining = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def caller(client: httpx.AsyncClient) -> None:
        for _ in remaining:
            try:
                results.append(await client.get(url))
            except Exception as exc:
                results.append(exc)

    async with (
        httpx.AsyncClient(limits=limits, timeout=10.0) as client,
        anyio.create_task_group() as tg,
    ):
        for _ in range(concurrency):
            tg.start_soon(caller, client)
    return results


def failures(results: list[httpx.Response | Exception]) -> list[str]:
    bad = [
        repr(r) if isinstance(r, Exception) else f"{r.status_code} {r.text}"
        for r in results
        if isinstance(r, Exception) or r.status_code != 200
    ]
    return bad[:5] + ([f"... {len(bad) - 5} more"] if len(bad) > 5 else [])


async def test_app_on_uvloop_keeps_each_host_at_its_quota_and_leaks_no_socket(
    upstream: Upstream, app_server: UvicornThread
) -> None:
    n, concurrency = 300, 30
    with anyio.fail_after(30):
        results = await hammer(app_server.url("/fanout"), n, concurrency)

    assert len(results) == n
    assert failures(results) == []
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert {loop_of(r) for r in responses} == {"uvloop"}
    assert all(upstream_hosts(r) == [H1, H2] for r in responses)
    assert all(status == 200 for r in responses for status, _ in r.json()["calls"])

    h1, h2 = upstream.stats(H1), upstream.stats(H2)
    # Never above the quota, and with 30 concurrent callers the quota is used in full.
    assert h1.peak_in_flight == QUOTAS[H1], upstream.describe()
    assert h2.peak_in_flight == QUOTAS[H2], upstream.describe()
    # One pool per host: never more sockets than the quota needs.
    assert h1.peak_open_sockets <= QUOTAS[H1] and h2.peak_open_sockets <= QUOTAS[H2]
    assert h1.requests == h1.completed == n
    assert h2.requests == h2.completed == n
    assert app_server.app.started["/fanout"] == n

    await app_server.astop()
    assert app_server.app.router_closed.is_set()
    await upstream.wait_until(
        lambda: upstream.total().open_sockets == 0, what="upstream sockets closed after shutdown"
    )


async def test_stalled_host_does_not_starve_the_other_through_the_app(
    upstream: Upstream, app_server: UvicornThread
) -> None:
    n_held, n_other = QUOTAS[H1] + 2, 20
    held: list[httpx.Response | Exception] = []
    limits = httpx.Limits(max_connections=n_held, max_keepalive_connections=n_held)

    async def call_held(client: httpx.AsyncClient) -> None:
        try:
            held.append(await client.get(app_server.url("/held")))
        except Exception as exc:
            held.append(exc)

    with anyio.fail_after(20):
        async with (
            httpx.AsyncClient(limits=limits, timeout=10.0) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(n_held):
                tg.start_soon(call_held, client)
            # 127.0.0.1's quota is full at the upstream, the rest wait in the router.
            await upstream.wait_until(lambda: upstream.held(HOLD_KEY) == QUOTAS[H1])
            await upstream.wait_until(lambda: app_server.app.started["/held"] == n_held)

            with anyio.fail_after(5):
                others = await hammer(app_server.url("/other"), n_other, 10)
            assert failures(others) == []
            assert {loop_of(r) for r in others if isinstance(r, httpx.Response)} == {"uvloop"}
            assert upstream.stats(H2).completed == n_other
            # 127.0.0.1 stayed stalled (and capped) the whole time.
            assert upstream.held(HOLD_KEY) == QUOTAS[H1]
            assert upstream.stats(H1).requests == QUOTAS[H1]

            upstream.release_all()

    assert failures(held) == []
    assert upstream.stats(H1).peak_in_flight == QUOTAS[H1]
    assert upstream.stats(H1).completed == n_held

    await app_server.astop()
    assert app_server.app.router_closed.is_set()
    await upstream.wait_until(
        lambda: upstream.total().open_sockets == 0, what="upstream sockets closed after shutdown"
    )
