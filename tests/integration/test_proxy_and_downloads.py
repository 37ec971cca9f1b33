"""The OpenRouter client honours HTTP(S)_PROXY / NO_PROXY; the downloader refuses answers that
are no download; admission limits say they are per worker (issue #11 item 14 c, d, e)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiohttp import web
from test_intake_fetcher import Resolver, limits

from openrouter_responses_pipe import (
    AiohttpTransport,
    Fetcher,
    IntakeError,
    Pipe,
    UpstreamConnectionError,
    Valves,
)

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
              "http_proxy", "https_proxy", "no_proxy", "all_proxy")


class TinyProxy:
    """Records each request head; answers plain-HTTP proxy requests with a model list and
    refuses CONNECT (which is enough to prove the client came through the proxy)."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.auth: list[str] = []  # each request's Proxy-Authorization ("" when none)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> TinyProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.heads.append(head.split("\r\n", 1)[0])
        self.auth.append(next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                               if line.lower().startswith("proxy-authorization:")), ""))
        if head.startswith("CONNECT"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        else:
            body = b'{"data": []}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    srv = await TinyProxy().start()
    yield srv
    await srv.stop()


async def fetch_models(base_url: str) -> object:
    transport = AiohttpTransport()
    try:
        resp = await transport.request("GET", base_url + "/models", headers={}, body=None,
                                       connect_timeout=3, read_timeout=3)
        return await resp.read()
    finally:
        await transport.aclose()


async def test_http_proxy_from_the_environment_carries_the_request(proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert await fetch_models("http://openrouter.invalid/api/v1") == b'{"data": []}'
    assert proxy.heads == ["GET http://openrouter.invalid/api/v1/models HTTP/1.1"]


async def test_https_proxy_from_the_environment_is_asked_to_connect(proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    with pytest.raises(UpstreamConnectionError):
        await fetch_models("https://openrouter.invalid/api/v1")
    assert proxy.heads == ["CONNECT openrouter.invalid:443 HTTP/1.1"]


async def test_no_proxy_hosts_are_reached_directly(proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "openrouter.invalid")
    with pytest.raises(UpstreamConnectionError):  # direct: the .invalid name doesn't resolve
        await fetch_models("http://openrouter.invalid/api/v1")
    assert proxy.heads == []


async def test_one_client_proxies_each_host_by_its_own_rule(proxy, monkeypatch, odd_server):
    """The proxy is looked up once per scheme and host, not once per client: a NO_PROXY
    host and a proxied host through the same client, each twice, each the right way."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    transport = AiohttpTransport()
    try:
        for _ in range(2):
            direct = await transport.request("GET", f"http://127.0.0.1:{odd_server}/empty",
                                             headers={}, body=None, connect_timeout=3,
                                             read_timeout=3)
            assert direct.status == 204  # the server itself answered, not the proxy
            await direct.release()
            via = await transport.request("GET", "http://openrouter.invalid/api/v1/models",
                                          headers={}, body=None, connect_timeout=3,
                                          read_timeout=3)
            assert await via.read() == b'{"data": []}'
    finally:
        await transport.aclose()
    assert proxy.heads == ["GET http://openrouter.invalid/api/v1/models HTTP/1.1"] * 2


async def test_proxy_credentials_in_the_environment_are_sent_to_the_proxy(proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://corp:s3cret@127.0.0.1:{proxy.port}")
    assert await fetch_models("http://openrouter.invalid/api/v1") == b'{"data": []}'
    assert proxy.auth == ["Basic " + base64.b64encode(b"corp:s3cret").decode()]


@pytest.mark.parametrize("base_url", ["http://[bad/api/v1", "http://openrouter.test:99999/api"])
async def test_a_malformed_base_url_is_a_connection_error_that_names_base_url(base_url):
    with pytest.raises(UpstreamConnectionError, match="BASE_URL"):
        await fetch_models(base_url)


# -- the downloader: 204 and non-redirect 3xx are failed downloads ---------------------------


@pytest.fixture
async def odd_server():
    app = web.Application()
    for path, status, headers in (("/empty", 204, {}), ("/reset", 205, {}),
                                  ("/not-modified", 304, {}),
                                  ("/choices", 300, {"Location": "/empty"})):
        app.router.add_get(path, _status(status, headers))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1]
    await runner.cleanup()


def _status(status: int, headers: dict[str, str]):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers)
    return handler


@pytest.mark.parametrize(("path", "words"), [
    ("/empty", "answered HTTP 204 (no content): there was nothing to download"),
    ("/reset", "answered HTTP 205 (no content)"),
    ("/not-modified", "answered HTTP 304, which is not a download"),
    ("/choices", "answered HTTP 300, which is not a download"),
])
async def test_no_content_and_odd_redirects_are_failed_downloads(odd_server, path, words):
    fetcher = Fetcher(Resolver(), lambda address, port: ("127.0.0.1", odd_server))
    with pytest.raises(IntakeError) as info:
        await fetcher.fetch(f"http://media.test{path}", limits(), 10**6)
    assert words in str(info.value)


# -- admission: the valves and the health report say "per worker" ----------------------------


def test_admission_valves_say_they_count_per_worker():
    fields = Valves.model_fields
    for name in ("MAX_CONCURRENT_REQUESTS", "MAX_QUEUED_REQUESTS",
                 "MAX_CONCURRENT_REQUESTS_PER_USER"):
        assert "per worker process" in (fields[name].description or ""), name


async def test_the_health_report_names_the_worker_its_counts_belong_to():
    import os

    p = Pipe()
    report = await p.pipe(body={"model": "openrouter._health", "stream": False,
                                "messages": [{"role": "user", "content": "report"}]},
                          __user__={"id": "admin", "role": "admin"})
    assert f"- Requests (this worker (pid {os.getpid()})): 0 in flight" in report
    await p.close()
