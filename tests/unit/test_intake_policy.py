"""Pure intake policy (issue #4): SSRF address/URL rules, data URLs, sizes, MIME sniffing."""

from __future__ import annotations

import base64
import ipaddress
import tracemalloc
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrouter_responses_pipe import (
    MB,
    AudioPart,
    FilePart,
    ImagePart,
    IntakeError,
    PayloadTooLargeError,
    UnsafeURLError,
    UserValves,
    Valves,
    VideoPart,
    check_url,
    classify_ip,
    estimate_base64_size,
    intake_limits,
    is_video_page,
    kind_of_mime,
    owui_file_id,
    parse_content,
    parse_data_url,
    parse_host_ip,
    settle_mime,
    sniff_mime,
    vet_addresses,
)


def limits(**valves):
    user = valves.pop("user", None) or UserValves()
    return intake_limits(Valves(API_KEY="k", **valves), user)


# ------------------------------------------------------------------ IP classification

BLOCKED = [
    # IPv4 classes
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"), ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "private"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"), ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"), ("198.18.0.1", "private"),
    ("192.0.2.10", "private"), ("192.0.0.8", "reserved"),
    # cloud metadata endpoints
    ("169.254.169.254", "cloud metadata"), ("169.254.170.2", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("168.63.129.16", "cloud metadata"),
    # IPv6 classes
    ("::1", "loopback"), ("::", "unspecified"), ("[::]", "unspecified"),
    ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("ff02::1", "multicast"), ("fec0::1", "site-local"),
    ("2001:db8::1", "private"),
    # IPv6 forms that embed an IPv4 address
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"), ("::ffff:10.0.0.1", "private (IPv4-mapped)"),
    ("::ffff:169.254.169.254", "cloud metadata (IPv4-mapped)"),
    ("::ffff:7f00:1", "loopback (IPv4-mapped)"),
    ("::127.0.0.1", "loopback (IPv4-compatible)"), ("::10.0.0.1", "private (IPv4-compatible)"),
    ("64:ff9b::10.0.0.1", "private (NAT64)"), ("64:ff9b::127.0.0.1", "loopback (NAT64)"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata (NAT64)"), ("64:ff9b:1::1", "local NAT64"),
    ("2002:0a00::", "private (6to4)"), ("2002:7f00:0001::1", "loopback (6to4)"),
    ("2002:a9fe:a9fe::", "cloud metadata (6to4)"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"), ("2001::1", "Teredo"),
]


@pytest.mark.parametrize(("address", "expected"), BLOCKED)
def test_internal_addresses_are_refused_with_their_class(address, expected):
    reason = classify_ip(address)
    assert reason is not None, f"{address} got through"
    assert expected in reason


@pytest.mark.parametrize("address", [
    "93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::200e",
    "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:0808:0808::1", "100.63.255.255", "100.128.0.1"])
def test_public_addresses_pass(address):
    assert classify_ip(address) is None


@pytest.mark.parametrize(("host", "ip"), [
    ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"), ("10.1", "10.0.0.1"), ("0", "0.0.0.0"),
    ("3232235777", "192.168.1.1"), ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("127.0.0.1.", "127.0.0.1"), ("[::1]", "::1"), ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
])
def test_numeric_host_forms_parse_like_inet_aton(host, ip):
    assert parse_host_ip(host) == ipaddress.ip_address(ip)


@pytest.mark.parametrize("host", ["example.com", "localhost", "1.example", "0x7g.1", "a.1",
                                  "1.2.3.4.5"])
def test_dns_names_are_not_mistaken_for_addresses(host):
    assert parse_host_ip(host) is None


@pytest.mark.parametrize("host", ["256.1.1.1", "08.0.0.1", "1.16777216", "0x100000000"])
def test_malformed_numeric_hosts_are_refused(host):
    with pytest.raises(UnsafeURLError, match="malformed"):
        parse_host_ip(host)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_in_decimal_hex_and_mapped_form_classifies_like_dotted(value):
    dotted = ipaddress.IPv4Address(value)
    expected = classify_ip(dotted)
    assert classify_ip(parse_host_ip(str(value))) == expected
    assert classify_ip(parse_host_ip(hex(value))) == expected
    mapped = classify_ip(f"::ffff:{dotted}")
    assert (mapped is None) == (expected is None)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_classification_never_crashes_and_global_only_passes(value):
    ip = ipaddress.IPv6Address(value)
    reason = classify_ip(str(ip))
    if reason is None:
        embedded = ip.ipv4_mapped or ip.sixtofour
        assert ip.is_global or (embedded is not None and embedded.is_global) or (
            ip in ipaddress.ip_network("64:ff9b::/96")) or (
            ip in ipaddress.ip_network("::/96"))


# ------------------------------------------------------------------ URL policy


@pytest.mark.parametrize(("url", "words"), [
    ("http://example.com/a.png", "plain http"),
    ("ftp://example.com/a.png", "'ftp:'"),
    ("file:///etc/passwd", "'file:'"),
    ("gopher://example.com/", "'gopher:'"),
    ("https://user:pw@example.com/", "user name or password"),
    ("https://127.0.0.1/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("https://[::]/", "unspecified"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("https://[fd00:ec2::254]/", "cloud metadata"),
    ("https://100.100.100.200/", "cloud metadata"),
    ("https://100.64.0.1/", "carrier-grade NAT"),
    ("https://[fe80::1%25eth0]/", "link-local"),
    ("https://[64:ff9b::10.0.0.1]/", "NAT64"),
    ("https://example.com\\@127.0.0.1/", "malformed"),
    ("https:///nohost", "no host"),
    ("https://example.com:99999/", "invalid port"),
])
def test_url_policy_refuses_with_a_specific_reason(url, words):
    with pytest.raises(UnsafeURLError) as err:
        check_url(url, limits())
    assert words in str(err.value)


def test_http_allowed_only_by_valve():
    target = check_url("http://example.com/x.png?a=1", limits(REMOTE_FETCH_ALLOW_HTTP=True))
    assert (target.scheme, target.host, target.port) == ("http", "example.com", 80)
    assert target.url == "http://example.com:80/x.png?a=1"
    with pytest.raises(UnsafeURLError):  # still no internal address
        check_url("http://10.0.0.1/", limits(REMOTE_FETCH_ALLOW_HTTP=True))


def test_host_allow_and_deny_lists_include_subdomains():
    lim = limits(REMOTE_FETCH_ALLOWED_HOSTS="*.Example.com, cdn.org",
                 REMOTE_FETCH_DENIED_HOSTS="bad.example.com")
    assert check_url("https://img.example.com/a", lim).host == "img.example.com"
    assert check_url("https://cdn.org/a", lim).host == "cdn.org"
    with pytest.raises(UnsafeURLError, match="never fetched"):
        check_url("https://x.bad.example.com/a", lim)
    with pytest.raises(UnsafeURLError, match="not on the admin's list"):
        check_url("https://example.org/a", lim)
    with pytest.raises(UnsafeURLError, match="not on the admin's list"):
        check_url("https://notexample.com/a", lim)


def test_international_host_names_are_checked_in_their_punycode_form():
    assert check_url("https://bücher.example/a", limits()).host == "xn--bcher-kva.example"
    for listed in ("xn--bcher-kva.example", "Bücher.example"):
        with pytest.raises(UnsafeURLError, match="never fetched"):
            check_url("https://BÜCHER.example/a", limits(REMOTE_FETCH_DENIED_HOSTS=listed))


def test_every_resolved_record_must_be_public():
    assert vet_addresses("ok.test", ["93.184.216.34", "2606:4700::1"]) == [
        "93.184.216.34", "2606:4700::1"]
    with pytest.raises(UnsafeURLError, match=r"10\.0\.0\.7, a private"):
        vet_addresses("rebind.test", ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(IntakeError, match="no address"):
        vet_addresses("none.test", [])


def test_owui_file_urls_are_recognised_only_when_relative():
    assert owui_file_id("/api/v1/files/3f2a-b1/content") == "3f2a-b1"
    assert owui_file_id("/api/v1/files/abc") == "abc"
    assert owui_file_id("/api/v1/files/abc/content?attachment=true") == "abc"
    assert owui_file_id("https://evil.test/api/v1/files/abc/content") is None
    assert owui_file_id("/api/v1/files/../../etc/passwd") is None
    own = "http://chat.example.org:8080"
    assert owui_file_id("http://chat.example.org:8080/api/v1/files/abc/content", own) == "abc"
    assert owui_file_id("http://evil.test/api/v1/files/abc/content", own) is None
    assert owui_file_id("http://chat.example.org:8080.evil.test/api/v1/files/abc", own) is None


def test_own_origin_comes_from_open_webuis_request():
    from types import SimpleNamespace

    from openrouter_responses_pipe import request_origin

    assert request_origin(SimpleNamespace(base_url="http://localhost:8080/")) == (
        "http://localhost:8080")
    assert request_origin(None) == "" and request_origin(SimpleNamespace(base_url="")) == ""


# ------------------------------------------------------------------ data URLs and sizes

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"1 0 obj\n" * 4
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 30
MP3 = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 20


def test_data_url_parsing_keeps_the_payload_encoded():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    parsed = parse_data_url(url)
    assert (parsed.mime, parsed.is_base64) == ("image/png", True)
    assert parsed.size == len(PNG) and parsed.head().startswith(PNG[:8])
    assert parse_data_url("data:image/JPG;base64,/9j/").mime == "image/jpeg"
    assert parse_data_url("data:,hello%20world").size == len("hello world")
    assert parse_data_url("data:text/plain;charset=utf-8;base64,aGk=").as_base64() == "aGk="


@pytest.mark.parametrize("url", ["data:image/png;base64,@@@@", "data:image/png;base64,abcde",
                                 "data:image/png;base64", "image/png;base64,AAAA"])
def test_malformed_data_urls_are_refused(url):
    with pytest.raises(IntakeError):
        parse_data_url(url)


@given(st.binary(max_size=3000))
def test_size_estimate_from_length_equals_decoded_size(data):
    encoded = base64.b64encode(data).decode()
    assert estimate_base64_size(encoded) == len(data)
    parsed = parse_data_url("data:application/octet-stream;base64," + encoded)
    assert parsed.size == len(data)
    assert data.startswith(parsed.head()) or not data


@given(st.text(max_size=200))
def test_data_url_parser_never_raises_anything_but_intake_error(text):
    try:
        parse_data_url("data:" + text)
    except IntakeError:
        pass


# ------------------------------------------------------------------ MIME sniffing


@pytest.mark.parametrize(("head", "mime"), [
    (PNG, "image/png"), (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
    (b"GIF89a\x01\x00", "image/gif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
    (PDF, "application/pdf"), (WAV, "audio/wav"), (MP3, "audio/mpeg"),
    (b"\xff\xfb\x90\x64" + b"\x00" * 8, "audio/mpeg"), (b"OggS\x00\x02", "audio/ogg"),
    (b"\x00\x00\x00\x18ftypmp42\x00", "video/mp4"),
    (b"\x00\x00\x00\x14ftypqt  ", "video/quicktime"),
    (b"\x1aE\xdf\xa3\x9fB\x86", "video/webm"), (b"hello world", None), (b"", None),
])
def test_magic_bytes(head, mime):
    assert sniff_mime(head) == mime


@given(st.binary(max_size=64))
def test_sniffing_arbitrary_bytes_never_crashes(head):
    assert sniff_mime(head) is None or "/" in sniff_mime(head)


def test_magic_bytes_beat_the_label_and_kinds_are_enforced():
    assert settle_mime("image", "image/gif", "image/png") == "image/png"
    assert settle_mime("file", "application/pdf", "application/pdf") == "application/pdf"
    assert settle_mime("file", "text/csv", None) == "text/csv"
    assert settle_mime("audio", "audio/x-wav", None) == "audio/x-wav"
    with pytest.raises(IntakeError, match="PNG, JPEG, WebP or GIF"):
        settle_mime("image", "image/png", "application/pdf")  # a PDF posing as an image
    with pytest.raises(IntakeError, match="content is not a PNG, JPEG, WebP or GIF picture"):
        settle_mime("image", "image/png", None)  # bytes of no known picture format
    with pytest.raises(IntakeError, match="WAV or MP3"):
        settle_mime("audio", "audio/ogg", "audio/ogg")
    with pytest.raises(IntakeError, match="video"):
        settle_mime("video", "video/mp4", "application/pdf")
    assert [kind_of_mime(m) for m in ("image/png", "audio/mpeg", "video/mp4",
                                      "application/pdf")] == ["image", "audio", "video", "file"]


# ------------------------------------------------------------------ content parts


def test_every_attachment_shape_open_webui_and_clients_send_is_typed():
    parts = parse_content([
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==",
                                            "detail": "high"}},
        {"type": "input_image", "image_url": "https://x.test/a.png"},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;b"}},
        {"type": "input_file", "file_id": "abc", "filename": "b.pdf"},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://youtu.be/x"}},
        {"type": "input_video", "video_url": "data:video/mp4;base64,AAAA"},
        {"type": "hologram"}])
    assert parts[1] == ImagePart("data:image/png;base64,AA==", "high")
    assert parts[2] == ImagePart("https://x.test/a.png", None)
    assert parts[3] == FilePart("data:application/pdf;b", "a.pdf")
    assert parts[4] == FilePart("/api/v1/files/abc/content", "b.pdf")
    assert parts[5] == AudioPart("UklGRg==", "wav")
    assert parts[6] == VideoPart("https://youtu.be/x")
    assert parts[7] == VideoPart("data:video/mp4;base64,AAAA")
    assert parts[8].kind == "hologram"


# ------------------------------------------------------------------ URL policy, fuzzed


@given(st.text(max_size=80), st.sampled_from(["https://", "http://", "ftp://", "", "//"]))
def test_check_url_either_refuses_clearly_or_names_a_public_or_dns_host(rest, scheme):
    try:
        target = check_url(scheme + rest, limits())
    except UnsafeURLError as exc:
        assert str(exc)
        return
    assert target.scheme == "https"
    assert target.literal is None or classify_ip(target.literal) is None
    assert target.url.startswith("https://")


# ------------------------------------------------------------------ __files__ and image caps


def _entry(*inputs):
    from openrouter_responses_pipe import CatalogEntry, Pricing

    return CatalogEntry(id="m/x", name="M", canonical_slug="m/x", description="",
                        context_length=1, max_output_tokens=1,
                        input_modalities=frozenset(("text", *inputs)),
                        output_modalities=frozenset({"text"}),
                        supported_parameters=frozenset(), pricing=Pricing(), reasoning=None)


def _job(entry, **valves):
    from openrouter_responses_pipe import Emitter, IntakeJob

    return IntakeJob(entry, limits(**valves), "u1", "user", Emitter(None))


def test_files_entries_become_parts_by_content_type():
    from openrouter_responses_pipe import file_part

    def item(ctype, kind="file", name="x"):
        return {"type": kind, "id": "f1", "name": name, "content_type": ctype}

    assert file_part(item("application/pdf", name="a.pdf")) == FilePart(
        "/api/v1/files/f1/content", "a.pdf")
    assert file_part(item("audio/mpeg")) == AudioPart("/api/v1/files/f1/content")
    assert file_part(item("video/mp4")) == VideoPart("/api/v1/files/f1/content")
    assert file_part(item("image/png")) is None  # images come as image_url parts
    assert file_part(item("application/pdf", kind="collection")) is None  # knowledge base
    assert file_part({"type": "file", "name": "no id"}) is None
    nested = {"type": "file", "file": {"id": "f2", "filename": "r.pdf",
                                       "meta": {"content_type": "application/pdf"}}}
    assert file_part(nested) == FilePart("/api/v1/files/f2/content", "r.pdf")


def test_files_attach_to_the_last_user_message_only_when_allowed():
    from openrouter_responses_pipe import ChatMessage, TextPart, attach_files

    msgs = (ChatMessage("user", (TextPart("a"),)), ChatMessage("assistant", (TextPart("b"),)),
            ChatMessage("user", (TextPart("c"),)))
    files = [{"type": "file", "id": "f1", "name": "a.pdf", "content_type": "application/pdf"}]
    assert attach_files(msgs, files, _job(_entry("file"))) == msgs  # valve off: RAG only
    on = attach_files(msgs, files, _job(_entry("file"), SEND_FILES_NATIVELY=True))
    assert on[2].parts == (TextPart("c"), FilePart("/api/v1/files/f1/content", "a.pdf"))
    assert on[:2] == msgs[:2]
    user = UserValves(SEND_FILES_NATIVELY="on")
    assert attach_files(msgs, files, _job(_entry("image"), user=user)) == msgs  # can't read
    assert attach_files(on, files, _job(_entry("file"), user=user)) == on  # never twice


def test_image_cap_keeps_the_newest():
    from openrouter_responses_pipe import ChatMessage, RefusedPart, cap_images

    msgs = [ChatMessage("user", (ImagePart("a"), ImagePart("b"))),
            ChatMessage("user", (ImagePart("c"),))]
    out = cap_images(msgs, 2, _entry("image"))
    assert out[1].parts == (ImagePart("c"),)
    assert out[0].parts[1] == ImagePart("b") and isinstance(out[0].parts[0], RefusedPart)
    assert cap_images(msgs, 0, _entry()) == msgs  # no vision: the transformer notes them


def test_each_kind_maps_to_its_responses_part_or_a_note():
    from openrouter_responses_pipe import RefusedPart, TextPart, UnsupportedPart, input_parts

    parts = [TextPart("hi"), ImagePart("data:image/png;base64,AA==", "low"),
             FilePart("data:application/pdf;base64,JVBE", "a.pdf"),
             FilePart("https://x.test/b.pdf"), AudioPart("UklG", "wav"),
             VideoPart("https://youtu.be/x"), RefusedPart("image", "An image was left out: x"),
             UnsupportedPart("hologram")]
    out, notes = input_parts(parts, _entry("image", "file", "audio", "video"))
    assert out == [
        {"type": "input_text", "text": "hi"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": "low"},
        {"type": "input_file", "filename": "a.pdf",
         "file_data": "data:application/pdf;base64,JVBE"},
        {"type": "input_file", "filename": "attachment", "file_url": "https://x.test/b.pdf"},
        {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
        {"type": "input_video", "video_url": "https://youtu.be/x"}]
    assert notes == ["An image was left out: x", "An attachment of type 'hologram' can't be "
                     "sent to the model and was left out."]
    out, notes = input_parts([*parts[1:6], FilePart("data:text/csv;base64,YQ==", "a.csv")],
                             _entry())
    # PDFs go to every model: OpenRouter parses them (file-parser plugin, issue #12)
    assert out == [
        {"type": "input_file", "filename": "a.pdf",
         "file_data": "data:application/pdf;base64,JVBE"},
        {"type": "input_file", "filename": "attachment", "file_url": "https://x.test/b.pdf"}]
    assert notes == [
        "M can't read images, so an image was left out of the request.",
        "M can't read audio, so an audio clip was left out of the request.",
        "M can't read video, so a video was left out of the request.",
        "M can't read files, so a file was left out of the request."]


@pytest.mark.parametrize(("url", "page"), [
    ("https://www.youtube.com/watch?v=x", True), ("https://youtu.be/x", True),
    ("https://m.youtube.com/shorts/x", True), ("https://youtube.com.evil.example/x.mp4", False),
    ("https://www.youtube.com./watch?v=x", True),
    ("https://evil.example/youtube.com/x.mp4", False), ("https://cdn.example.com/a.mp4", False),
    ("https://[::1/x", False), ("data:video/mp4;base64,AAAA", False),
])
def test_only_video_platform_pages_are_left_for_the_provider_to_fetch(url, page):
    assert is_video_page(url) is page


# ------------------------------------------------------------------ size before parsing


def _wrapped(encoded: str, blanks: list[str]) -> str:
    """`encoded` with whitespace inserted after every 1..n characters (as mail/PEM wrap)."""
    out, i = [], 0
    for j, blank in enumerate(blanks):
        step = j % 7 + 1
        out.append(encoded[i:i + step] + blank)
        i += step
    return "".join(out) + encoded[i:]


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=900),
       st.lists(st.sampled_from([" ", "\n", "\r\n", "\t", "\f", "    "]), max_size=200))
def test_base64_refusal_from_the_length_matches_the_exact_decoded_size(data, cap, blanks):
    """Whether the raw length decides (fast path) or the payload is counted, a data URL is
    refused exactly when its decoded bytes are over the cap."""
    url = "data:image/png;base64," + _wrapped(base64.b64encode(data).decode(), blanks)
    if len(data) > cap:
        with pytest.raises(PayloadTooLargeError, match="over the"):
            parse_data_url(url, "image", cap)
    else:
        assert parse_data_url(url, "image", cap).size == len(data)


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=900),
       st.sampled_from(["", "/", "/:;=?&@ "]))
def test_percent_encoded_refusal_matches_the_exact_decoded_size(data, cap, safe):
    url = "data:application/octet-stream," + urllib.parse.quote_from_bytes(data, safe=safe)
    if len(data) > cap:
        with pytest.raises(PayloadTooLargeError, match="over the"):
            parse_data_url(url, "file", cap)
    else:
        assert parse_data_url(url, "file", cap).size == len(data)


async def test_huge_attachments_are_refused_without_copying_or_decoding_them():
    """64 MB of base64 (an image data URL, a raw audio clip) and 48 MB of percent-encoding
    against 1 MB caps: each is refused with the cap named, and the intake's peak allocation
    stays a tiny fraction of the payload (no copy, no whitespace scan, no decode)."""
    from openrouter_responses_pipe import Intake

    job = _job(_entry("image", "file", "audio"), MAX_IMAGE_MB=1, MAX_FILE_MB=1,
               MAX_AUDIO_MB=1)
    raw = "A" * (64 * MB)
    cases = [(ImagePart("data:image/png;base64," + raw), "The image is about 48.0 MB"),
             (FilePart("data:application/pdf," + "%41" * (16 * MB), "a.pdf"),
              "The file is at least 16.0 MB"),
             (AudioPart(raw, "mp3"), "The audio clip is about 48.0 MB")]
    for part, words in cases:
        tracemalloc.start()
        try:
            refused = await Intake()._part(part, job)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * MB, peak
        assert words in refused.reason and "over the 1.0 MB limit" in refused.reason


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.lists(st.integers(1, 50), max_size=4), max_size=6),
       cap=st.integers(0, 300))
def test_the_request_cap_keeps_the_newest_attachments_and_reports_every_other(sizes, cap):
    from openrouter_responses_pipe import ChatMessage, RefusedPart, cap_request_size, inline_size

    messages = [ChatMessage("user", tuple(ImagePart("data:image/png;base64," + "A" * n)
                                          for n in msg)) for msg in sizes]
    out = cap_request_size(messages, cap)
    flat_in = [p for m in messages for p in m.parts]
    flat_out = [p for m in out for p in m.parts]
    assert len(flat_out) == len(flat_in)                      # nothing silently dropped
    kept = [p for p in flat_out if not isinstance(p, RefusedPart)]
    assert sum(inline_size(p) for p in kept) <= cap
    # greedy from the newest: a refused part would not have fitted next to the newer ones kept
    used = 0
    for before, after in zip(reversed(flat_in), reversed(flat_out), strict=True):
        if isinstance(after, RefusedPart):
            assert used + inline_size(before) > cap
        else:
            assert after == before
            used += inline_size(before)
