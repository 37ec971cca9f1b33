"""The SSRF-safe fetcher against a real HTTP server on loopback (issue #4).

The policy is never switched off: the injected resolver answers with public-looking
addresses (or internal ones, for the attacks) and a test-only `dial` maps the public
address to the local server, which is what a DNS answer plus a route would do.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import ssl
from collections import Counter

import pytest
from aiohttp import web

from openrouter_responses_pipe import (
    Fetcher,
    IntakeError,
    PayloadTooLargeError,
    UnsafeURLError,
    UserValves,
    Valves,
    intake_limits,
)

PUBLIC = "93.184.216.34"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
DNS = {"media.test": [PUBLIC], "internal.test": ["10.0.0.5"], "meta.test": ["169.254.169.254"],
       "rebind.test": [PUBLIC, "127.0.0.1"], "v6.test": ["::ffff:127.0.0.1"]}


def limits(**valves):
    valves.setdefault("REMOTE_FETCH_ALLOW_HTTP", True)
    return intake_limits(Valves(API_KEY="k", **valves), UserValves())


def reply(status: int, body: bytes = b"", content_type: str = "text/plain"):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)
    return handler


def redirect(location: str, status: int = 302):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": location})
    return handler


class Server:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.port = 0
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.middlewares.append(self._count)
        app.router.add_get("/img.png", reply(200, PNG, "image/png"))
        app.router.add_get("/to-private", redirect("http://internal.test/x"))
        app.router.add_get("/to-metadata-ip", redirect("http://169.254.169.254/latest/"))
        app.router.add_get("/to-file", redirect("file:///etc/passwd"))
        app.router.add_get("/to-img", redirect("/img.png", 301))
        app.router.add_get("/loop", redirect("/loop"))
        app.router.add_get("/drip", self._drip)
        app.router.add_get("/big-declared", self._big_declared)
        app.router.add_get("/big-streamed", self._big_streamed)
        app.router.add_get("/busy-then-ok", self._busy_then_ok)
        app.router.add_get("/always-503", reply(503))
        app.router.add_get("/gone", reply(404))
        return app

    @web.middleware
    async def _count(self, request, handler):
        self.hits[request.path] += 1
        return await handler(request)

    async def _drip(self, request):
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for _ in range(600):
            await resp.write(b"\x00")
            await asyncio.sleep(0.05)
        return resp

    async def _big_declared(self, request):
        return web.Response(body=b"\x00" * (3 * 1024 * 1024), content_type="image/png")

    async def _big_streamed(self, request):
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):  # 4 MiB in total, no Content-Length
            await resp.write(b"\x00" * 65536)
        return resp

    async def _busy_then_ok(self, request):
        if self.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "3"})
        return web.Response(body=PNG, content_type="image/png")

    async def start(self, ssl_context=None) -> None:
        self.runner = web.AppRunner(self.app())
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def server():
    srv = Server()
    await srv.start()
    yield srv
    await srv.stop()


class Resolver:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in DNS:
            raise IntakeError(f"{host} could not be resolved (test DNS).")
        return DNS[host]


def make_fetcher(server: Server, sleeps: list[float] | None = None, **kw) -> Fetcher:
    def dial(address: str, port: int) -> tuple[str, int]:
        assert address == PUBLIC, f"dialing an unvetted address {address}"
        return "127.0.0.1", server.port

    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return Fetcher(kw.pop("resolver", Resolver()), dial, sleep=sleep, **kw)


async def test_downloads_through_the_vetted_address(server):
    got = await make_fetcher(server).fetch("http://media.test/img.png", limits(), 10**6)
    assert got.data == PNG and got.mime == "image/png" and got.filename == "img.png"


async def test_http_is_refused_by_default(server):
    with pytest.raises(UnsafeURLError, match="Only https links are fetched; this one is plain"):
        await make_fetcher(server).fetch("http://media.test/img.png",
                                         limits(REMOTE_FETCH_ALLOW_HTTP=False), 10**6)
    assert server.hits["/img.png"] == 0


@pytest.mark.parametrize(("path", "words"), [
    ("/to-private", "internal.test resolves to 10.0.0.5, a private address"),
    ("/to-metadata-ip", "169.254.169.254 is a cloud metadata address"),
    ("/to-file", "'file:'"),
])
async def test_every_redirect_hop_is_checked_again(server, path, words):
    with pytest.raises(UnsafeURLError) as err:
        await make_fetcher(server).fetch(f"http://media.test{path}", limits(), 10**6)
    assert words in str(err.value)
    assert server.hits[path] == 1  # refused at the next hop, and never retried


async def test_a_safe_redirect_is_followed_and_a_loop_is_stopped(server):
    got = await make_fetcher(server).fetch("http://media.test/to-img", limits(), 10**6)
    assert got.data == PNG
    with pytest.raises(IntakeError, match="redirected more than 5 times"):
        await make_fetcher(server).fetch("http://media.test/loop", limits(), 10**6)


@pytest.mark.parametrize(("host", "words"), [
    ("internal.test", "private"), ("meta.test", "cloud metadata"),
    ("rebind.test", "127.0.0.1, a loopback"), ("v6.test", "loopback (IPv4-mapped)")])
async def test_a_host_with_any_internal_record_is_never_contacted(server, host, words):
    with pytest.raises(UnsafeURLError, match=re.escape(words)):
        await make_fetcher(server).fetch(f"http://{host}/img.png", limits(), 10**6)
    assert sum(server.hits.values()) == 0


async def test_dns_is_asked_once_per_hop_and_the_answer_is_what_gets_dialed(server):
    resolver = Resolver()
    await make_fetcher(server, resolver=resolver).fetch("http://media.test/to-img", limits(),
                                                        10**6)
    assert resolver.asked == ["media.test", "media.test"]  # one lookup per hop, no re-resolve


async def test_a_slow_drip_is_cut_by_the_total_budget(server):
    with pytest.raises(IntakeError, match="longer than 1 seconds"):
        await make_fetcher(server).fetch("http://media.test/drip",
                                         limits(REMOTE_FETCH_TIMEOUT_SECONDS=1), 10**6)
    assert server.hits["/drip"] == 1


async def test_oversize_is_refused_from_content_length(server):
    with pytest.raises(PayloadTooLargeError, match=r"3\.0 MB, over the 1\.0 MB limit"):
        await make_fetcher(server).fetch("http://media.test/big-declared", limits(), 2**20)


async def test_oversize_is_refused_while_streaming(server):
    with pytest.raises(PayloadTooLargeError, match=r"passed the 1\.0 MB limit"):
        await make_fetcher(server).fetch("http://media.test/big-streamed", limits(), 2**20)


async def test_429_is_retried_after_the_retry_after_delay(server):
    sleeps: list[float] = []
    got = await make_fetcher(server, sleeps).fetch("http://media.test/busy-then-ok",
                                                   limits(), 10**6)
    assert got.data == PNG and sleeps == [3.0] and server.hits["/busy-then-ok"] == 2


async def test_404_is_not_retried(server):
    sleeps: list[float] = []
    with pytest.raises(IntakeError, match="answered HTTP 404, so the download was not retried"):
        await make_fetcher(server, sleeps).fetch("http://media.test/gone", limits(), 10**6)
    assert server.hits["/gone"] == 1 and sleeps == []


async def test_5xx_gives_up_after_the_configured_tries(server):
    sleeps: list[float] = []
    with pytest.raises(IntakeError, match=r"failed after 3 tries \(HTTP 503\)"):
        await make_fetcher(server, sleeps).fetch("http://media.test/always-503",
                                                 limits(REMOTE_FETCH_RETRIES=2), 10**6)
    assert server.hits["/always-503"] == 3 and len(sleeps) == 2


async def test_network_errors_are_retried(server):
    port = server.port
    await server.stop()  # nothing listens there any more: connection refused
    sleeps: list[float] = []
    with pytest.raises(IntakeError, match=r"failed after 2 tries \(connection refused\)") \
            as info:
        await make_fetcher(server, sleeps).fetch(
            f"http://media.test:{port}/img.png", limits(REMOTE_FETCH_RETRIES=1), 10**6)
    assert len(sleeps) == 1
    assert "127.0.0.1" not in str(info.value)  # the kind of failure, never the address


# ------------------------------------------------------------------ TLS: SNI + certificate


def _self_signed(tmp_path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def tls_server(tmp_path):
    cert, key = _self_signed(tmp_path, "media.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    srv = Server()
    await srv.start(server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    yield srv, client_ctx
    await srv.stop()


async def test_https_checks_the_certificate_for_the_host_name_not_the_address(tls_server):
    srv, client_ctx = tls_server
    lim = limits(REMOTE_FETCH_ALLOW_HTTP=False)
    got = await make_fetcher(srv, ssl=client_ctx).fetch("https://media.test/img.png", lim, 10**6)
    assert got.data == PNG
    DNS["other.test"] = [PUBLIC]  # same address, a name the certificate doesn't cover
    try:
        sleeps: list[float] = []
        with pytest.raises(IntakeError, match=r"secure connection failed.*(certificate|hostname)"):
            await make_fetcher(srv, sleeps, ssl=client_ctx).fetch(
                "https://other.test/img.png", limits(), 10**6)
        assert sleeps == []  # not retried
    finally:
        del DNS["other.test"]
    assert ipaddress.ip_address(PUBLIC).is_global


async def test_a_retry_after_beyond_the_budget_is_not_waited_for(server):
    sleeps: list[float] = []
    with pytest.raises(IntakeError, match=r"failed after 1 try \(HTTP 429\)"):
        await make_fetcher(server, sleeps).fetch("http://media.test/busy-then-ok",
                                                 limits(REMOTE_FETCH_TIMEOUT_SECONDS=2), 10**6)
    assert sleeps == [] and server.hits["/busy-then-ok"] == 1
