"""Webhooks against a real HTTP server on loopback: signatures, retries, and SSRF refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from omnidaemon.errors import ConfigurationError, OmniDaemonError
from omnidaemon.retry import Backoff
from omnidaemon.webhooks import (
    WebhookRefused,
    WebhookSender,
    WebhookSettings,
    check_url,
    sign,
    verify,
)
from tests.http_receiver import Answer, Receiver, black_hole, serving
from tests.tls_certs import Certificates, make_certificates

SECRET = "test-secret"
TINY = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving() as rec:
        yield rec


def settings(**overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "secret": SECRET,
        "allow_private": True,  # the receiver is on loopback
        "timeout": 2.0,
        "max_elapsed": 2.0,
        "backoff": TINY,
    }
    values.update(overrides)
    return WebhookSettings(**values)


def fake_resolver(table: dict[str, Sequence[str]]) -> Any:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


BODY = {"event_id": "evt-1", "topic": "doc.done", "status": "succeeded", "result": {"n": 1}}


# Signatures -------------------------------------------------------------------------------------


def test_sign_is_hmac_sha256_over_timestamp_event_id_and_body() -> None:
    body = b'{"a":1}'
    message = b"1700000000\nevt-1\n" + body
    expected = hmac.new(b"k", message, hashlib.sha256).hexdigest()
    assert sign(body, 1_700_000_000, "k", event_id="evt-1") == f"sha256={expected}"


def test_verify_accepts_a_fresh_signature_and_rejects_tampering_and_replays() -> None:
    body, ts = b'{"a":1}', 1_700_000_000
    signature = sign(body, ts, SECRET, event_id="e1")
    check = partial(verify, event_id="e1")
    assert check(body, signature, ts, SECRET, now=ts + 10)
    assert check(body, signature, str(ts), SECRET, now=ts - 10)  # header value, clock skew
    assert not check(b'{"a":2}', signature, ts, SECRET, now=ts)  # tampered body
    assert not check(body, signature, ts, "other-secret", now=ts)
    assert not check(body, signature, ts + 1, SECRET, now=ts)  # timestamp changed
    assert not check(body, signature, ts, SECRET, now=ts + 301)  # too old: replay
    assert not check(body, signature, ts, SECRET, now=ts - 301)  # from the future
    assert check(body, signature, ts, SECRET, now=ts + 1000, tolerance=1000)
    assert not check(body, "sha256=" + "0" * 64, ts, SECRET, now=ts)
    assert not check(body, "garbage-ü", ts, SECRET, now=ts)
    assert not check(body, signature, "yesterday", SECRET, now=ts)
    assert not check(body, None, ts, SECRET, now=ts)  # header missing
    assert not check(body, signature, None, SECRET, now=ts)
    assert not verify(body, signature, ts, SECRET, now=ts)  # event id header missing
    assert not verify(body, signature, ts, SECRET, event_id="e2", now=ts)


def test_the_signed_parts_cannot_be_shifted_into_one_another() -> None:
    # With a separator an id could contain, "e" + "\n{..." and "e\n{" + "..." would sign the
    # same bytes; a header value never holds a line break, so verify refuses one outright.
    ts = 1_700_000_000
    signature = sign(b"x\n{}", ts, SECRET, event_id="e")
    assert verify(b"x\n{}", signature, ts, SECRET, event_id="e", now=ts)
    assert sign(b"{}", ts, SECRET, event_id="e\nx") == signature
    assert not verify(b"{}", signature, ts, SECRET, event_id="e\nx", now=ts)


# Delivery ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_body_and_headers_arrive_and_the_receiver_verifies_them(receiver: Receiver) -> None:
    async with WebhookSender(settings()) as sender:
        outcome = await sender.deliver(receiver.url("/hook?x=1"), BODY, event_id="evt-1")

    assert outcome.status == "delivered"
    assert (outcome.attempts, outcome.status_code, outcome.error) == (1, 200, None)
    assert sender.counts == {"delivered": 1, "failed": 0, "refused": 0}
    [request] = receiver.requests
    assert request.path == "/hook?x=1"
    assert json.loads(request.body) == BODY
    headers = request.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("omnidaemon/")
    assert headers["X-Omnidaemon-Event-Id"] == "evt-1"
    timestamp = int(headers["X-Omnidaemon-Timestamp"])
    assert abs(timestamp - time.time()) < 60
    signature = headers["X-Omnidaemon-Signature"]
    check = partial(verify, event_id="evt-1")
    assert check(request.body, signature, headers["X-Omnidaemon-Timestamp"], SECRET)
    assert not check(request.body + b" ", signature, timestamp, SECRET)
    assert not check(request.body, signature, timestamp, SECRET, now=timestamp + 3600)


@pytest.mark.anyio
async def test_a_captured_delivery_replayed_under_another_event_id_fails_verify(
    receiver: Receiver,
) -> None:
    """Receivers deduplicate on `X-Omnidaemon-Event-Id`; the signature left it out, so a
    captured delivery replayed with a fresh id passed `verify` and was acted on twice
    (issue 15)."""
    async with WebhookSender(settings()) as sender:
        await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    [captured] = receiver.requests
    headers = captured.headers

    def passes(event_id: str) -> bool:
        return verify(
            captured.body,
            headers["X-Omnidaemon-Signature"],
            headers["X-Omnidaemon-Timestamp"],
            SECRET,
            event_id=event_id,
        )

    assert passes(headers["X-Omnidaemon-Event-Id"])  # intact
    assert not passes("evt-2")  # replayed as a new event
    assert not passes("evt-1 ")


@pytest.mark.anyio
async def test_unsigned_mode_sends_no_signature_and_warns_once(receiver: Receiver) -> None:
    with capture_logs() as logs:
        async with WebhookSender(settings(secret=None)) as sender:
            for _ in range(2):
                outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
                assert outcome.status == "delivered"
    assert len(receiver.requests) == 2
    assert all("X-Omnidaemon-Signature" not in r.headers for r in receiver.requests)
    assert all("X-Omnidaemon-Timestamp" in r.headers for r in receiver.requests)
    warnings = [entry for entry in logs if entry["event"] == "webhooks are unsigned"]
    assert len(warnings) == 1


@pytest.mark.anyio
async def test_errors_are_retried_until_delivered(receiver: Receiver) -> None:
    receiver.script(500, 500, 200)
    async with WebhookSender(settings()) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts, outcome.status_code) == ("delivered", 3, 200)
    assert len(receiver.requests) == 3
    # Every attempt is signed afresh and carries the same event id, for deduplication.
    for request in receiver.requests:
        assert request.headers["X-Omnidaemon-Event-Id"] == "evt-1"
        assert verify(
            request.body,
            request.headers["X-Omnidaemon-Signature"],
            request.headers["X-Omnidaemon-Timestamp"],
            SECRET,
            event_id=request.headers["X-Omnidaemon-Event-Id"],
        )


@pytest.mark.anyio
async def test_a_receiver_that_always_fails_makes_the_delivery_fail_in_bounded_time(
    receiver: Receiver,
) -> None:
    receiver.script(*[500] * 1000)
    with capture_logs() as logs:
        async with WebhookSender(settings(max_elapsed=0.4)) as sender:
            outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-9")
    assert outcome.status == "failed"
    assert (outcome.status_code, outcome.error) == (500, "HTTP 500")
    assert outcome.attempts == len(receiver.requests) > 3
    assert outcome.elapsed <= 0.4 + 0.25
    assert sender.counts["failed"] == 1
    [entry] = [e for e in logs if e["event"] == "webhook failed"]
    assert entry["event_id"] == "evt-9"
    assert entry["host"] == "127.0.0.1"
    assert entry["attempts"] == outcome.attempts
    assert entry["status"] == "failed"
    assert "url" not in entry


@pytest.mark.anyio
async def test_max_elapsed_zero_tries_once(receiver: Receiver) -> None:
    receiver.script(500)
    async with WebhookSender(settings(max_elapsed=0)) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts, len(receiver.requests)) == ("failed", 1, 1)


@pytest.mark.anyio
async def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with WebhookSender(settings(max_elapsed=0.3)) as sender:
        outcome = await sender.deliver(f"http://127.0.0.1:{port}/", BODY, event_id="evt-1")
    assert outcome.status == "failed"
    assert outcome.attempts > 1
    assert outcome.status_code is None
    assert outcome.error is not None and "ConnectError" in outcome.error
    assert outcome.elapsed <= 0.3 + 0.25


@pytest.mark.anyio
async def test_a_receiver_that_never_answers_times_out_within_the_bound(
    receiver: Receiver,
) -> None:
    receiver.script(*[Answer(hang=True)] * 10)
    async with WebhookSender(settings(timeout=0.2, max_elapsed=0.3)) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert outcome.status == "failed"
    assert outcome.error is not None and "timed out" in outcome.error.lower()
    assert outcome.attempts == len(receiver.requests) >= 2
    assert outcome.elapsed <= 0.3 + 0.25


@pytest.mark.anyio
async def test_retry_after_on_429_is_honoured(receiver: Receiver) -> None:
    receiver.script(Answer(429, {"Retry-After": "1"}), 200)
    async with WebhookSender(settings(max_elapsed=5)) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts) == ("delivered", 2)
    assert outcome.elapsed >= 1.0  # not the 10 ms backoff
    assert outcome.elapsed < 3.0


@pytest.mark.anyio
async def test_retry_after_past_the_bound_fails_at_once(receiver: Receiver) -> None:
    receiver.script(Answer(503, {"Retry-After": "3600"}))
    async with WebhookSender(settings(max_elapsed=5)) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts, outcome.status_code) == ("failed", 1, 503)
    assert outcome.error is not None and "Retry-After" in outcome.error
    assert outcome.elapsed < 1.0


@pytest.mark.anyio
async def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    # The redirect points at the receiver itself: following it would show up as a GET.
    redirect = Answer(302, {"Location": receiver.url("/elsewhere")})
    receiver.script(redirect, redirect, 200)
    async with WebhookSender(settings()) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts) == ("delivered", 3)
    assert [r.path for r in receiver.requests] == ["/hook"] * 3


@pytest.mark.anyio
async def test_an_endless_redirect_fails_and_says_why(receiver: Receiver) -> None:
    receiver.script(*[Answer(302, {"Location": receiver.url("/elsewhere")})] * 1000)
    async with WebhookSender(settings(max_elapsed=0.1)) as sender:
        outcome = await sender.deliver(receiver.url(), BODY, event_id="evt-1")
    assert (outcome.status, outcome.status_code) == ("failed", 302)
    assert outcome.error is not None and "redirects are not followed" in outcome.error
    assert {r.path for r in receiver.requests} == {"/hook"}


@pytest.mark.anyio
async def test_the_connection_goes_to_the_checked_address(receiver: Receiver) -> None:
    # `hooks.test` resolves only through our resolver: reaching the receiver proves the
    # request was sent to the address that was checked, with the name kept in `Host`.
    resolve = fake_resolver({"hooks.test": ["127.0.0.1"]})
    config = settings(allowed_hosts=("hooks.test",))
    async with WebhookSender(config, resolve=resolve) as sender:
        outcome = await sender.deliver(receiver.url(host="hooks.test"), BODY, event_id="e")
    assert outcome.status == "delivered"
    [request] = receiver.requests
    assert request.headers["Host"] == f"hooks.test:{receiver.port}"


# A name under `.invalid` never resolves (RFC 6761): reaching the server proves that the
# connection went to the address our resolver gave the check, not to a lookup of its own.
TLS_NAME = "hooks.omnidaemon.invalid"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"), TLS_NAME)


@pytest.fixture
def tls_receiver(certificates: Certificates) -> Iterator[Receiver]:
    with serving(tls=certificates.server_context()) as rec:
        yield rec


@pytest.mark.anyio
async def test_https_goes_to_the_checked_address_with_the_name_as_sni_and_host(
    tls_receiver: Receiver, certificates: Certificates
) -> None:
    """Over https the name was resolved again by httpx, so the address checked for SSRF was
    not necessarily the one connected to (issue 15). The certificate names `TLS_NAME` only, no
    IP address: the delivery verifies only if it is checked against the name."""
    resolve = fake_resolver({TLS_NAME: ["127.0.0.1"]})
    async with WebhookSender(
        settings(), resolve=resolve, ssl_context=certificates.client_context()
    ) as sender:
        outcome = await sender.deliver(tls_receiver.url(host=TLS_NAME), BODY, event_id="e1")
    assert (outcome.status, outcome.error) == ("delivered", None)
    [request] = tls_receiver.requests
    assert request.headers["Host"] == f"{TLS_NAME}:{tls_receiver.port}"
    assert tls_receiver.server_names == [TLS_NAME]
    assert resolve.calls == [TLS_NAME]


@pytest.mark.anyio
async def test_https_certificates_are_verified_against_the_name_on_every_connection(
    tls_receiver: Receiver, certificates: Certificates
) -> None:
    # `other` resolves to the same server, whose certificate is not valid for it: the open
    # connection verified for `TLS_NAME` must not carry it, and a new one must fail.
    other = "other.omnidaemon.invalid"
    resolve = fake_resolver({TLS_NAME: ["127.0.0.1"], other: ["127.0.0.1"]})
    config = settings(max_elapsed=0.2)
    async with WebhookSender(
        config, resolve=resolve, ssl_context=certificates.client_context()
    ) as sender:
        first = await sender.deliver(tls_receiver.url(host=TLS_NAME), BODY, event_id="e1")
        second = await sender.deliver(tls_receiver.url(host=other), BODY, event_id="e2")
    assert first.status == "delivered"
    assert second.status == "failed"
    assert second.error is not None and "certificate" in second.error.lower()
    assert [r.headers["X-Omnidaemon-Event-Id"] for r in tls_receiver.requests] == ["e1"]
    assert other in tls_receiver.server_names
    # Without the test CA (default trust), the certificate is not accepted for its own name.
    async with WebhookSender(config, resolve=resolve) as sender:
        untrusted = await sender.deliver(tls_receiver.url(host=TLS_NAME), BODY, event_id="e3")
    assert untrusted.status == "failed"
    assert untrusted.error is not None and "certificate" in untrusted.error.lower()
    assert len(tls_receiver.requests) == 1


@pytest.mark.anyio
async def test_a_host_that_does_not_resolve_is_retried_then_fails() -> None:
    resolve = fake_resolver({})
    async with WebhookSender(settings(max_elapsed=0.1), resolve=resolve) as sender:
        outcome = await sender.deliver("http://nowhere.test/", BODY, event_id="evt-1")
    assert outcome.status == "failed"
    assert outcome.error is not None and "cannot resolve" in outcome.error
    assert len(resolve.calls) == outcome.attempts > 1


@pytest.mark.anyio
async def test_concurrent_deliveries_share_one_sender(receiver: Receiver) -> None:
    async with WebhookSender(settings()) as sender, anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(
                partial(sender.deliver, receiver.url(f"/hook/{n}"), BODY, event_id=f"e{n}")
            )
    assert sender.counts["delivered"] == 5
    assert sorted(r.path for r in receiver.requests) == [f"/hook/{n}" for n in range(5)]


@pytest.mark.anyio
async def test_deliver_needs_an_open_sender() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await WebhookSender(settings()).deliver("http://127.0.0.1/", BODY, event_id="e")


# SSRF -------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:{port}/hook", "loopback"),
        ("http://localhost:{port}/hook", "loopback"),
        ("http://[::1]:{port}/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://[fd00::1]/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0:{port}/hook", "unspecified"),
        ("http://[::]:{port}/hook", "unspecified"),
        ("http://100.64.0.1/hook", "carrier-grade NAT"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://user:pw@example.com/hook", "credentials"),
        ("ftp://127.0.0.1:{port}/hook", "scheme"),
        ("file:///etc/passwd", "scheme"),
    ],
)
async def test_ssrf_targets_are_refused_and_never_contacted(
    receiver: Receiver, url: str, reason: str
) -> None:
    url = url.format(port=receiver.port)
    config = settings(allow_private=False)
    with pytest.raises(WebhookRefused, match=reason):
        await check_url(url, config)
    async with WebhookSender(config) as sender:
        outcome = await sender.deliver(url, BODY, event_id="evt-1")
    assert (outcome.status, outcome.attempts, outcome.status_code) == ("refused", 0, None)
    assert outcome.error is not None and reason in outcome.error
    assert sender.counts == {"delivered": 0, "failed": 0, "refused": 1}
    assert receiver.requests == []


@pytest.mark.anyio
async def test_refusals_say_which_setting_allows_them() -> None:
    with pytest.raises(WebhookRefused, match="OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE=1"):
        await check_url("http://10.0.0.1/", settings(allow_private=False))
    with pytest.raises(WebhookRefused, match="OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS"):
        await check_url("https://evil.example/", settings(allowed_hosts=("good.example",)))
    assert issubclass(WebhookRefused, OmniDaemonError)


@pytest.mark.anyio
async def test_every_resolved_address_must_be_public() -> None:
    # A name with one public and one private address could connect to either.
    resolve = fake_resolver({"mixed.test": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(WebhookRefused, match=r"'mixed.test', which resolves to 10\.1\.2\.3"):
        await check_url("https://mixed.test/", settings(allow_private=False), resolve=resolve)
    rebind = fake_resolver({"metadata.test": ["169.254.169.254"]})
    with pytest.raises(WebhookRefused, match="link-local"):
        await check_url("http://metadata.test/", settings(allow_private=False), resolve=rebind)
    public = fake_resolver({"ok.test": ["93.184.216.34", "2606:2800:220:1::1"]})
    await check_url("https://ok.test/", settings(allow_private=False), resolve=public)


@pytest.mark.anyio
async def test_public_addresses_and_allowed_private_ones_pass() -> None:
    await check_url("https://93.184.216.34/hook", settings(allow_private=False))
    await check_url("https://[2606:2800:220:1::1]/hook", settings(allow_private=False))
    await check_url("http://[::ffff:93.184.216.34]/hook", settings(allow_private=False))
    await check_url("http://10.0.0.1/hook", settings(allow_private=True))


@pytest.mark.anyio
async def test_refusal_messages_hide_credentials_path_and_query() -> None:
    for url in (
        "http://user:s3cret-pw@example.com/p4th?token=t0ken",
        "http://10.0.0.1/p4th?token=t0ken",
    ):
        with pytest.raises(WebhookRefused) as info:
            await check_url(url, settings(allow_private=False))
        message = str(info.value)
        for secret in ("s3cret-pw", "p4th", "t0ken"):
            assert secret not in message


@pytest.mark.anyio
async def test_outcome_logs_show_the_host_only(receiver: Receiver) -> None:
    url = receiver.url("/p4th?token=t0ken")
    with capture_logs() as logs:
        async with WebhookSender(settings()) as sender:
            await sender.deliver(url, BODY, event_id="evt-1")
            await sender.deliver(
                "http://user:s3cret@10.0.0.1/p4th?token=t0ken", BODY, event_id="evt-2"
            )
    outcomes = [e for e in logs if e["event"].startswith("webhook ")]
    assert [(e["event"], e["event_id"]) for e in outcomes] == [
        ("webhook delivered", "evt-1"),
        ("webhook refused", "evt-2"),
    ]
    text = repr(logs)
    for secret in ("s3cret", "p4th", "t0ken", SECRET):
        assert secret not in text
    assert outcomes[0]["host"] == "127.0.0.1"


# Allow-list -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_allow_list_accepts_listed_hosts_and_refuses_others() -> None:
    resolve = fake_resolver(
        {
            name: ["93.184.216.34"]
            for name in ("hooks.example.com", "a.partner.io", "x.y.partner.io", "partner.io")
        }
    )
    config = settings(
        allow_private=False, allowed_hosts=("Hooks.Example.com.", "*.partner.io", "93.184.216.34")
    )
    for ok in (
        "https://hooks.example.com/h",
        "https://HOOKS.example.com:8443/h",
        "https://a.partner.io/h",
        "https://x.y.partner.io/h",
        "https://93.184.216.34/h",
    ):
        await check_url(ok, config, resolve=resolve)
    calls_so_far = len(resolve.calls)
    for refused in (
        "https://partner.io/h",  # the wildcard covers subdomains only
        "https://evil.com/h",
        "https://hooks.example.com.evil.com/h",
        "https://evilpartner.io/h",
        "https://93.184.216.35/h",
    ):
        with pytest.raises(WebhookRefused, match="not allowed"):
            await check_url(refused, config, resolve=resolve)
    assert len(resolve.calls) == calls_so_far  # refused before any lookup


@pytest.mark.anyio
async def test_an_allowed_host_must_still_be_public() -> None:
    resolve = fake_resolver({"internal.example.com": ["10.0.0.7"]})
    config = settings(allow_private=False, allowed_hosts=("internal.example.com",))
    with pytest.raises(WebhookRefused, match="private"):
        await check_url("https://internal.example.com/", config, resolve=resolve)


# Settings ---------------------------------------------------------------------------------------


def test_from_env_defaults() -> None:
    config = WebhookSettings.from_env({})
    assert config.secret is None
    assert config.allowed_hosts == ()
    assert config.allow_private is False
    assert (config.timeout, config.max_elapsed) == (10.0, 300.0)
    assert (config.backoff.initial, config.backoff.maximum) == (1.0, 60.0)
    assert (config.max_in_flight, config.max_queued_bytes) == (32, 16 * 1024 * 1024)


def test_from_env_reads_every_variable() -> None:
    config = WebhookSettings.from_env(
        {
            "OMNIDAEMON_WEBHOOK_SECRET": "s3cret",
            "OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS": " hooks.example.com, *.Partner.io ,",
            "OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE": "true",
            "OMNIDAEMON_WEBHOOK_TIMEOUT": "2.5",
            "OMNIDAEMON_WEBHOOK_MAX_ELAPSED": "60",
            "OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT": "4",
            "OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES": "0",
        }
    )
    assert config.secret == "s3cret"
    assert config.allowed_hosts == ("hooks.example.com", "*.partner.io")
    assert config.allow_private is True
    assert (config.timeout, config.max_elapsed) == (2.5, 60.0)
    assert (config.max_in_flight, config.max_queued_bytes) == (4, 0)
    assert "s3cret" not in repr(config)
    for value in ("1", "TRUE", "yes"):
        env = {"OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE": value}
        assert WebhookSettings.from_env(env).allow_private is True
    for value in ("0", "false", ""):
        env = {"OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE": value}
        assert WebhookSettings.from_env(env).allow_private is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OMNIDAEMON_WEBHOOK_TIMEOUT", "soon"),
        ("OMNIDAEMON_WEBHOOK_TIMEOUT", "0"),
        ("OMNIDAEMON_WEBHOOK_TIMEOUT", "inf"),
        ("OMNIDAEMON_WEBHOOK_MAX_ELAPSED", "-1"),
        ("OMNIDAEMON_WEBHOOK_MAX_ELAPSED", "nan"),
        ("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", "maybe"),
        ("OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT", "0"),
        ("OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT", "many"),
        ("OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES", "-1"),
        ("OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES", "16MiB"),
        ("OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS", "https://hooks.example.com"),
        ("OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS", "hooks.example.com:8443"),
        ("OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS", "hooks.example.com/path"),
        ("OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS", "*"),
        ("OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS", "a.*.example.com"),
    ],
)
def test_from_env_names_the_variable_with_a_bad_value(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        WebhookSettings.from_env({name: value})


def test_bad_settings_in_code_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        WebhookSettings(timeout=0)
    with pytest.raises(ConfigurationError, match="max_elapsed"):
        WebhookSettings(max_elapsed=-1)
    with pytest.raises(ConfigurationError, match="not a host name"):
        WebhookSettings(allowed_hosts=("http://x.example",))
    with pytest.raises(ConfigurationError, match="max_in_flight"):
        WebhookSettings(max_in_flight=0)
    with pytest.raises(ConfigurationError, match="max_queued_bytes"):
        WebhookSettings(max_queued_bytes=-1)


# Through the worker ------------------------------------------------------------------------


def _envs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_SECRET", "whsec-test")
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", "1")  # the receiver is on loopback


@pytest.mark.anyio
@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_the_worker_posts_each_outcome_once_when_the_event_is_finished(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, bus: str
) -> None:
    import orjson

    from omnidaemon import App, Context
    from omnidaemon.brokers import MemoryBroker, RedisBroker

    _envs(monkeypatch)
    broker = (
        MemoryBroker(None) if bus == "memory" else RedisBroker(request.getfixturevalue("redis_url"))
    )
    app = App("hooks", broker=broker)
    topic = f"hooks{uuid.uuid4().hex[:8]}.jobs"

    @app.agent(topic, max_retries=2, retry_backoff=0.01)
    async def work(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if event.get("fail"):
            raise ValueError("cannot do it")
        return {"doubled": event["n"] * 2}

    async with app.running():
        ok = await app.publish(topic, {"n": 21}, webhook=receiver.url("/ok"), correlation_id="c1")
        bad = await app.publish(topic, {"fail": True}, webhook=receiver.url("/bad"))
        with anyio.fail_after(10):
            while len(receiver.requests) < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # a third POST (one per failed attempt) must not come
    by_path = {r.path: r for r in receiver.requests}
    assert sorted(by_path) == ["/bad", "/ok"] and len(receiver.requests) == 2
    for received in by_path.values():
        headers = {k.lower(): v for k, v in received.headers.items()}
        assert verify(
            received.body,
            headers["x-omnidaemon-signature"],
            headers["x-omnidaemon-timestamp"],
            "whsec-test",
            event_id=headers["x-omnidaemon-event-id"],
        )
    good = orjson.loads(by_path["/ok"].body)
    assert good["event_id"] == ok and good["status"] == "succeeded"
    assert good["result"] == {"doubled": 42} and good["correlation_id"] == "c1"
    assert good["agent"] == "work" and good["topic"] == topic and good["finished_at"]
    failed = orjson.loads(by_path["/bad"].body)
    assert failed["event_id"] == bad and failed["status"] == "dead_lettered"
    assert failed["error"] == {"type": "ValueError", "message": "cannot do it"}
    assert "result" not in failed


@pytest.mark.anyio
async def test_a_webhook_to_a_private_address_is_refused_by_the_worker(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker

    monkeypatch.delenv("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", raising=False)
    app = App("hooks", broker=MemoryBroker(None))
    handled = anyio.Event()

    @app.agent("ssrf.jobs")
    async def work(event: dict[str, Any]) -> None:
        handled.set()

    with capture_logs() as logs:
        async with app.running():
            await app.publish("ssrf.jobs", {"n": 1}, webhook=receiver.url("/internal"))
            with anyio.fail_after(5):
                await handled.wait()
                while not any(e["event"] == "webhook refused" for e in logs):
                    await anyio.sleep(0.02)
    assert receiver.requests == []


@pytest.mark.anyio
async def test_a_receivers_odd_retry_after_never_stops_the_worker(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Retry-After: ²` passes `str.isdigit()` but not `float()`: the exception escaped the
    webhook task into the worker's task group and stopped every agent (issue 15)."""
    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker

    _envs(monkeypatch)
    receiver.script(Answer(503, {"Retry-After": "\u00b2"}))  # then 200
    app = App("hooks", broker=MemoryBroker(None))
    handled: list[int] = []

    @app.agent("odd.jobs")
    async def work(event: dict[str, Any]) -> None:
        handled.append(event["n"])

    async with app.running():
        await app.publish("odd.jobs", {"n": 1}, webhook=receiver.url("/odd"))
        with anyio.fail_after(10):
            while len(receiver.requests) < 2:  # the 503, then the retry that is accepted
                await anyio.sleep(0.02)
        await app.publish("odd.jobs", {"n": 2})
        with anyio.fail_after(5):
            while handled != [1, 2]:
                await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_a_result_json_cannot_carry_is_dead_lettered_and_the_worker_goes_on(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler returning bytes was fine without a webhook and fatal with one; with stored
    results it was redelivered forever (issue 15). It is dead-lettered where it is produced,
    with the reason, and the webhook and the stored result say so."""
    import orjson

    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker

    _envs(monkeypatch)
    app = App("hooks", broker=MemoryBroker(None))
    handled: list[int] = []

    @app.agent("bytes.jobs", store_results=True)
    async def work(event: dict[str, Any]):  # type: ignore[no-untyped-def]  # unchecked return
        handled.append(event["n"])
        return {"sha": b"\x00\x01"} if event["n"] == 1 else None

    async with app.running():
        event_id = await app.publish("bytes.jobs", {"n": 1}, webhook=receiver.url("/b"))
        with anyio.fail_after(10):
            while not receiver.requests:
                await anyio.sleep(0.02)
        await app.publish("bytes.jobs", {"n": 2})
        with anyio.fail_after(5):
            while handled != [1, 2]:
                await anyio.sleep(0.02)
        result = await app.result(event_id, timeout=5)
        [letter] = await app.dead_letters("work")
    body = orjson.loads(receiver.requests[0].body)
    assert body["event_id"] == event_id and body["status"] == "dead_lettered"
    assert body["error"]["type"] == "ResultNotJSON"
    assert result.status == "dead_lettered" and letter.error_type == "ResultNotJSON"


@pytest.mark.anyio
async def test_a_receiver_that_never_answers_costs_a_bounded_number_of_deliveries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every finished event started a delivery retried for up to 300 s, with no cap: a
    receiver that accepts and never answers grew a worker by 120 MB for 200 events of 256 KiB
    (issue 15). At most MAX_IN_FLIGHT deliveries run, MAX_QUEUED_BYTES of bodies wait, the
    rest are dropped and logged, and events are still handled and acknowledged at once."""
    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker
    from omnidaemon.worker import Worker

    blob = "x" * 16_000  # every body is a little over 16 000 bytes: two fit in 40 000
    _envs(monkeypatch)
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_TIMEOUT", "60")  # attempts hang until the test ends
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES", "40000")
    broker = MemoryBroker(None)
    app = App("hooks", broker=broker)
    handled: list[int] = []

    @app.agent("silent.jobs", concurrency=8)
    async def work(event: dict[str, Any]) -> dict[str, Any]:
        handled.append(event["n"])
        return {"blob": event["blob"]}

    events = 30
    with black_hole() as hole, capture_logs() as logs:
        worker = Worker(app, shutdown_grace=0.2)
        async with worker.started():
            for n in range(events):
                await app.publish("silent.jobs", {"n": n, "blob": blob}, webhook=hole.url())
            [consumer] = worker.consumers
            with anyio.fail_after(10):  # promptly, though no webhook will ever be answered
                # Handled and acknowledged, with the deliveries under way.
                while (
                    len(handled) < events
                    or broker.pending(consumer.subscription)
                    or hole.accepted < 3
                ):
                    await anyio.sleep(0.02)
            # Dropped as they finish, before their acknowledgement: all logged by now.
            dropped = [e for e in logs if e["event"] == "webhook dropped"]
            assert len(dropped) == events - 3 - 2
            assert hole.peak == 3
            notifier = worker.notifier
            assert notifier is not None
            assert (notifier.in_flight, notifier.queued) == (3, 2)
            assert notifier.counts["dropped"] == events - 3 - 2
    assert all(e["host"] == "127.0.0.1" and "MAX_IN_FLIGHT" in e["hint"] for e in dropped)
    stopping = [e for e in logs if e["event"] == "webhooks not sent: the worker is stopping"]
    assert [(e["in_flight"], e["queued"]) for e in stopping] == [(3, 2)]


@pytest.mark.anyio
async def test_deliveries_beyond_the_in_flight_limit_wait_their_turn(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue is what keeps a burst to a healthy receiver from being dropped."""
    from omnidaemon import App
    from omnidaemon.brokers import MemoryBroker
    from omnidaemon.worker import Worker

    _envs(monkeypatch)
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT", "1")
    app = App("hooks", broker=MemoryBroker(None))

    @app.agent("burst.jobs", concurrency=8)
    async def work(event: dict[str, Any]) -> int:
        return int(event["n"])

    worker = Worker(app)
    async with worker.started():
        ids = [
            await app.publish("burst.jobs", {"n": n}, webhook=receiver.url(f"/{n}"))
            for n in range(10)
        ]
        assert worker.notifier is not None
        notifier = worker.notifier
        # The receiver records a request before its answer reaches the notifier, which then
        # counts the delivery: wait for both.
        with anyio.fail_after(10):
            while len(receiver.requests) < 10 or notifier.counts["delivered"] < 10:
                await anyio.sleep(0.02)
        assert notifier.counts == {"delivered": 10, "failed": 0, "refused": 0, "dropped": 0}
    received = {r.headers["X-Omnidaemon-Event-Id"] for r in receiver.requests}
    assert received == set(ids)
