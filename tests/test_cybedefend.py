"""bridge.cybedefend.client over httpx.MockTransport: auth, retries, error translation, no secret leaks."""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from bridge.cybedefend.client import CybeDefendClient, read_credential_file
from bridge.errors import (
    AmbiguousWrite,
    AuthenticationError,
    ConfigError,
    CybeDefendError,
    InvalidRequest,
    LegacyApiKeyGone,
    NotFound,
    PermissionDenied,
    RateLimited,
    TransientError,
)
from bridge.metrics import Metrics
from bridge.model import Sensitive
from tests.support.cybedefend_mock import (
    API,
    API_KEY,
    AUTH,
    CLI_APP,
    ORG,
    PAT,
    PROJECT,
    FakeClock,
    MockApi,
    error,
    make_client,
    settings,
)

DH_TOKEN = "dckr_pat_SuperSecretDockerHubToken123"
CRED = "9c1e4b2a-6d3f-4e8a-b7c5-1f2e3d4c5b6a"
CREATE_TEMPLATE = "POST /integrations/dockerhub/container-registry/organization/{organizationId}/credentials"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"cybedefend_bridge_{name}", labels)
    return value or 0.0


def full_text(exc: BaseException) -> str:
    """Everything a traceback of `exc` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def create(client: CybeDefendClient) -> object:
    return client.create(ORG, PROJECT, "alice", Sensitive(DH_TOKEN), "[cybedefend-bridge:default:0123456789ab:v1]")


# ---- PAT exchange ---------------------------------------------------------------------------


def test_pat_exchange_sends_the_documented_form_and_caches_the_bearer() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    assert client.list_project(PROJECT) == []
    assert client.list_project(PROJECT) == []
    assert api.count("client_apps") == 1 and api.count("token_exchange") == 1
    exchange = api.of("token_exchange")[0]
    assert str(exchange.url) == AUTH + "/oidc/token"
    assert exchange.headers["content-type"] == "application/x-www-form-urlencoded"
    form = {k: v[0] for k, v in parse_qs(exchange.content.decode()).items()}
    assert form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "client_id": CLI_APP,
        "subject_token": PAT,
        "subject_token_type": "urn:logto:token-type:personal_access_token",
        "resource": API,
    }
    assert "authorization" not in api.of("client_apps")[0].headers
    assert "authorization" not in exchange.headers
    lists = api.of("list")
    assert all(r.headers["authorization"] == f"Bearer {api.issued[0]}" for r in lists)
    assert all(str(r.url).startswith(API) and "x-api-key" not in r.headers for r in lists)


def test_bearer_is_renewed_margin_before_expiry() -> None:
    api = MockApi(expires_in=600)
    client, clock, _ = make_client(api, token_renew_margin_seconds=60)
    client.list_project(PROJECT)
    clock.now += 539
    client.list_project(PROJECT)
    assert api.count("token_exchange") == 1
    clock.now += 1  # 540 s = 600 - 60
    client.list_project(PROJECT)
    assert api.count("token_exchange") == 2
    assert api.count("client_apps") == 1  # the cli appId is cached
    assert api.of("list")[-1].headers["authorization"] == f"Bearer {api.issued[1]}"


def test_renewal_never_before_half_the_tokens_life() -> None:
    api = MockApi(expires_in=60)
    client, clock, _ = make_client(api, token_renew_margin_seconds=300)
    client.list_project(PROJECT)
    clock.now += 29
    client.list_project(PROJECT)
    assert api.count("token_exchange") == 1
    clock.now += 1
    client.list_project(PROJECT)
    assert api.count("token_exchange") == 2


def test_401_re_exchanges_once_and_retries_the_call() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    client.list_project(PROJECT)
    api.valid_tokens.clear()  # the server forgot every token
    assert client.get(PROJECT, CRED) is not None
    assert api.count("token_exchange") == 2
    assert api.count("get") == 2


def test_401_twice_gives_up_with_a_clear_error() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("list", error(401, "Unauthorized"), error(401, "Unauthorized"), error(401, "Unauthorized"))
    with pytest.raises(AuthenticationError) as info:
        client.list_project(PROJECT)
    assert "rejected the bearer token twice" in str(info.value)
    assert "PAT is valid and not revoked" in str(info.value)
    assert api.count("list") == 2 and api.count("token_exchange") == 2
    assert not info.value.retryable


def test_create_is_retried_after_a_401_because_it_was_not_processed() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("create", error(401, "Unauthorized"))
    create(client)
    assert api.count("create") == 2


def test_revoked_pat_is_an_authentication_error_without_retry() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("token_exchange", httpx.Response(401, json={"error": "invalid_grant", "error_description": PAT}))
    with pytest.raises(AuthenticationError) as info:
        client.list_project(PROJECT)
    assert "invalid, expired or revoked" in str(info.value)
    assert PAT not in full_text(info.value)
    assert api.count("token_exchange") == 1 and api.count("list") == 0


def test_wrong_client_app_is_named() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("client_apps", httpx.Response(200, json={"cli": {"appId": "not-the-cli"}}))
    with pytest.raises(AuthenticationError) as info:
        client.list_project(PROJECT)
    assert info.value.status == 400
    assert "not CybeDefend's CLI app" in str(info.value)
    assert client.list_project(PROJECT) == []  # the appId is asked again, and now it is right
    assert api.count("client_apps") == 2


def test_concurrent_callers_share_one_exchange() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            client.list_project(PROJECT)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert api.count("token_exchange") == 1 and api.count("list") == 8


def test_authenticate_describes_the_bearer() -> None:
    api = MockApi(expires_in=600)
    client, _, _ = make_client(api)
    assert client.authenticate() == "PAT exchanged; bearer valid for 600 s"
    assert client.authenticate() == "PAT exchanged; bearer valid for 600 s"
    assert api.count("token_exchange") == 2  # forced, not served from the cache


# ---- API keys -----------------------------------------------------------------------------------


def test_api_key_header_and_authenticate() -> None:
    api = MockApi()
    client, _, _ = make_client(api, mode="api_key", organization_id=ORG)
    assert client.authenticate() == "API key accepted"
    client.list_project(PROJECT)
    req = api.of("list")[0]
    assert req.headers["x-api-key"] == API_KEY and "authorization" not in req.headers
    assert api.count("token_exchange") == 0


def test_api_key_410_is_one_clear_unretried_error(caplog: pytest.LogCaptureFixture) -> None:
    api = MockApi()
    client, clock, _ = make_client(api, mode="api_key")
    api.queue("create", error(410, "Gone"))
    with caplog.at_level(logging.DEBUG), pytest.raises(LegacyApiKeyGone) as info:
        create(client)
    assert "cybedefend.auth.mode" in str(info.value) and "`pat`" in str(info.value)
    assert "personal access token" in str(info.value)
    assert not info.value.retryable and api.count("create") == 1 and clock.sleeps == []
    assert API_KEY not in full_text(info.value) and API_KEY not in caplog.text


def test_constructor_refuses_a_credential_with_control_characters() -> None:
    # h11 would quote such a header value in its error; refuse it before any request
    with pytest.raises(ConfigError) as info:
        CybeDefendClient(
            make_client(MockApi())[0]._settings, Sensitive("abc\r\nX-Evil: 1"), Metrics(),
            transport=httpx.MockTransport(MockApi()),
        )
    assert "abc" not in str(info.value) and info.value.key == "cybedefend.auth.credential_file"


# ---- error translation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status,kind", [(400, InvalidRequest), (403, PermissionDenied), (404, NotFound), (409, CybeDefendError)]
)
def test_client_errors_are_classified_and_not_retried(status: int, kind: type[CybeDefendError]) -> None:
    api = MockApi()
    client, clock, _ = make_client(api)
    api.queue("get_links", error(status, ["projectIds must be an array", "each value must be a UUID"]))
    with pytest.raises(kind) as info:
        client.linked_projects(ORG, CRED)
    text = str(info.value)
    # The ids are filled in (they are not secrets; an operator needs to know which organization
    # refused), and a 403 says which permission to grant.
    assert text.startswith(f"HTTP {status} GET /integrations/container-registry/organization/{ORG}/credentials/dockerhub/{CRED}/projects: ")
    assert "{organizationId}" not in text and "{credentialId}" not in text
    assert "projectIds must be an array; each value must be a UUID" in text
    hint = f"the PAT's user needs manage_integration on organization {ORG}"
    assert (hint in text) == (status == 403), text
    assert not info.value.retryable and api.count("get_links") == 1 and clock.sleeps == []


def test_get_404_is_none_and_delete_404_is_false() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("get", error(404, "Credential not found"))
    api.queue("delete", error(404, "Credential not found"))
    assert client.get(PROJECT, CRED) is None
    assert client.delete(ORG, CRED) is False
    assert client.delete(ORG, CRED) is True


def test_error_message_never_echoes_secrets_or_the_body(caplog: pytest.LogCaptureFixture) -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    client.list_project(PROJECT)
    bearer = api.issued[0]
    echo = [f"accessToken {DH_TOKEN} is invalid", f"your PAT {PAT}", f"bearer {bearer}"]
    api.queue("create", error(400, echo))
    with caplog.at_level(logging.DEBUG), pytest.raises(InvalidRequest) as info:
        create(client)
    text = full_text(info.value)
    assert CREATE_TEMPLATE.format(organizationId=ORG) in str(info.value) and "is invalid" in str(info.value)
    for secret in (DH_TOKEN, PAT, bearer):
        assert secret not in text
        assert secret not in caplog.text
        assert all(secret not in str(getattr(r, "fields", "")) for r in caplog.records)
    assert "alice" not in str(info.value)  # the body is not quoted


def test_transport_error_text_is_scrubbed_in_the_chain() -> None:
    api = MockApi()
    client, _, _ = make_client(api, retry={"max_attempts": 1})
    api.queue("list", httpx.ConnectError(f"proxy said no to {PAT}"))
    with pytest.raises(TransientError) as info:
        client.list_project(PROJECT)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert PAT not in full_text(info.value)
    assert "ConnectError" in str(info.value)


def test_tolerant_decoding() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    item = {"id": CRED, "dockerhubUsername": "alice", "createdAt": "2026-01-01T00:00:00Z", "description": "d"}
    api.queue("list", httpx.Response(200, json={"success": True, "data": [item, {"no": "id"}]}))
    api.queue("get_links", httpx.Response(200, json=[PROJECT]))
    api.queue("get_links", httpx.Response(200, json={"data": {"projectIds": [PROJECT, 7]}}))
    creds = client.list_project(PROJECT)
    assert [(c.id, c.username, c.description) for c in creds] == [(CRED, "alice", "d")]
    assert client.linked_projects(ORG, CRED) == [PROJECT]
    assert client.linked_projects(ORG, CRED) == [PROJECT]


def test_set_linked_projects_sends_the_whole_set() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    client.set_linked_projects(ORG, CRED, [PROJECT, ORG])
    req = api.of("set_links")[0]
    assert req.method == "PUT" and req.read() == b'{"projectIds":["' + PROJECT.encode() + b'","' + ORG.encode() + b'"]}'


def test_path_parameters_cannot_add_segments() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    client.get(PROJECT, "../../x?y=1")
    assert api.of("get")[0].url.raw_path.endswith(b"/credentials/..%2F..%2Fx%3Fy%3D1")


# ---- retries ------------------------------------------------------------------------------------


def test_retry_after_seconds_is_honoured() -> None:
    api = MockApi()
    client, clock, metrics = make_client(api)
    api.queue("list", error(429, "slow down", {"Retry-After": "7"}))
    client.list_project(PROJECT)
    assert api.count("list") == 2
    assert len(clock.sleeps) == 1 and clock.sleeps[0] >= 7.0
    assert sample(metrics, "rate_limited_waits_total") == 1
    assert sample(metrics, "rate_limited_wait_seconds_total") == pytest.approx(clock.sleeps[0])
    assert sample(metrics, "retries_total", target="cybedefend") == 1
    assert sample(metrics, "cybedefend_requests_total", endpoint="list", status_class="4xx") == 1
    assert sample(metrics, "cybedefend_requests_total", endpoint="list", status_class="2xx") == 1


def test_retry_after_http_date_is_honoured() -> None:
    api = MockApi()
    now = 1_800_000_000.0
    client, clock, _ = make_client(api, wall_clock=lambda: now)
    api.queue("get", error(503, "maintenance", {"Retry-After": email.utils.formatdate(now + 12, usegmt=True)}))
    client.get(PROJECT, CRED)
    assert clock.sleeps[0] >= 12.0


def test_retry_after_beyond_the_cap_is_not_slept_through() -> None:
    api = MockApi()
    client, clock, _ = make_client(api, retry={"cap_seconds": 30})
    api.queue("create", error(429, "later", {"Retry-After": "3600"}))
    with pytest.raises(RateLimited) as info:
        create(client)
    assert info.value.retry_after == 3600.0 and info.value.retryable
    assert clock.sleeps == [] and api.count("create") == 1


def test_429_without_retry_after_backs_off_until_attempts_run_out() -> None:
    api = MockApi()
    client, clock, _ = make_client(api, retry={"max_attempts": 4, "base_seconds": 0.5, "cap_seconds": 30})
    api.queue("create", *[error(429, "busy") for _ in range(4)])
    with pytest.raises(RateLimited) as info:
        create(client)
    assert info.value.retry_after is None
    assert api.count("create") == 4 and len(clock.sleeps) == 3
    assert all(0 <= s <= 0.5 * 2**i for i, s in enumerate(clock.sleeps))


def test_create_is_retried_after_429_then_succeeds() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("create", error(429, "busy", {"Retry-After": "1"}))
    assert create(client) is not None
    assert api.count("create") == 2


def test_5xx_on_reads_is_retried_then_gives_up() -> None:
    api = MockApi()
    client, clock, metrics = make_client(api, retry={"max_attempts": 3})
    api.queue("list", error(502), error(500))
    assert client.list_project(PROJECT) == []
    assert api.count("list") == 3 and len(clock.sleeps) == 2
    api.queue("delete", error(503), error(503), error(503))
    with pytest.raises(TransientError) as info:
        client.delete(ORG, CRED)
    assert info.value.status == 503 and not isinstance(info.value, RateLimited)
    assert sample(metrics, "cybedefend_requests_total", endpoint="delete", status_class="5xx") == 3


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("timed out"), httpx.RemoteProtocolError("Server disconnected"), httpx.ReadError("reset"),
     httpx.WriteTimeout("timed out"), error(500), error(502), error(504)],
    ids=lambda f: type(f).__name__ if isinstance(f, Exception) else f"HTTP{f.status_code}",
)
def test_create_with_unknown_fate_is_ambiguous_and_never_resent(failure: Exception | httpx.Response) -> None:
    api = MockApi()
    client, clock, metrics = make_client(api)
    api.queue("create", failure)
    with pytest.raises(AmbiguousWrite) as info:
        create(client)
    assert api.count("create") == 1 and clock.sleeps == []
    assert info.value.retryable and "adopt by marker" in str(info.value)
    assert CREATE_TEMPLATE in str(info.value)
    if isinstance(failure, Exception):
        assert info.value.__cause__ is failure
        assert sample(metrics, "cybedefend_requests_total", endpoint="create", status_class="error") == 1


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("timed out")])
def test_create_is_retried_when_it_certainly_was_not_sent(failure: Exception) -> None:
    api = MockApi()
    client, clock, _ = make_client(api)
    api.queue("create", failure)
    assert create(client) is not None
    assert api.count("create") == 2 and len(clock.sleeps) == 1


def test_create_with_unreadable_201_is_ambiguous() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("create", httpx.Response(201, text="<html>ok</html>"))
    with pytest.raises(AmbiguousWrite):
        create(client)


def test_reads_are_retried_after_timeouts_and_drops() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    api.queue("get", httpx.ReadTimeout("timed out"), httpx.RemoteProtocolError("dropped"))
    assert client.get(PROJECT, CRED) is not None
    assert api.count("get") == 3


def test_create_sends_the_documented_body() -> None:
    api = MockApi()
    client, _, _ = make_client(api)
    cred = client.create(ORG, PROJECT, "alice", Sensitive(DH_TOKEN), "desc")
    body = json.loads(api.of("create")[0].content)
    assert body == {"projectId": PROJECT, "dockerhubUsername": "alice", "accessToken": DH_TOKEN, "description": "desc"}
    assert cred.username == "alice" and cred.description == "desc"
    client.create(ORG, PROJECT, "alice", Sensitive(DH_TOKEN), "")
    assert "description" not in json.loads(api.of("create")[1].content)


# ---- concurrency and rate caps ------------------------------------------------------------------


def test_concurrency_is_capped() -> None:
    api = MockApi()
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def slow(_: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return httpx.Response(200, json=[])

    client, _, _ = make_client(api, mode="api_key", max_concurrency=2)
    api.queue("list", *[slow] * 8)
    threads = [threading.Thread(target=client.list_project, args=(PROJECT,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert api.count("list") == 8
    assert peak == 2


def test_request_rate_is_capped() -> None:
    api = MockApi()
    clock = FakeClock()
    client, _, _ = make_client(api, mode="api_key", clock=clock, max_requests_per_second=2)
    for _ in range(5):
        client.list_project(PROJECT)
    # burst of 2, then one request every 0.5 s
    assert clock.sleeps == pytest.approx([0.5, 0.5, 0.5])


# ---- credential file ----------------------------------------------------------------------------


def test_read_credential_file_strips_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "pat"
    path.write_text(f"  {PAT}\n")
    value = read_credential_file(path)
    assert value.reveal() == PAT and PAT not in repr(value)


@pytest.mark.parametrize("content", [None, "", "  \n", "two words\n"])
def test_read_credential_file_errors_name_the_key(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "pat"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_credential_file(path)
    assert info.value.key == "cybedefend.auth.credential_file"
    assert str(path) in str(info.value)
    assert "words" not in str(info.value)


# ---- bearer cache (pure) ------------------------------------------------------------------------


def test_bearer_cache_ignores_a_stale_invalidation() -> None:
    from bridge.cybedefend.auth import BearerCache

    clock = FakeClock()
    issued = iter([Sensitive("tok-one-abcdef"), Sensitive("tok-two-abcdef")])
    cache = BearerCache(lambda: (next(issued), 600.0), renew_margin=60, clock=clock)
    first = cache.get()
    cache.invalidate(first)
    second = cache.get()
    assert second == Sensitive("tok-two-abcdef")
    cache.invalidate(first)  # a slow thread reporting the old token must not drop the new one
    assert cache.get() is second


def test_token_response_without_expires_in_gets_a_short_default() -> None:
    from bridge.cybedefend.auth import DEFAULT_EXPIRES_IN, parse_token_response

    token, expires_in = parse_token_response({"access_token": "abc.def.ghi", "token_type": "Bearer"})
    assert token.reveal() == "abc.def.ghi" and expires_in == DEFAULT_EXPIRES_IN
    with pytest.raises(AuthenticationError):
        parse_token_response({"access_token": "has space", "token_type": "Bearer"})
    with pytest.raises(AuthenticationError):
        parse_token_response({"token_type": "Bearer"})


# ---- how requests are sent ----------------------------------------------------------------------


def test_requests_still_go_through_a_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client sends on the transport httpx.Client resolved for the URL (docs/adr/0013), not
    # through Client.send: a proxy named by the environment (trust_env) must still carry requests.
    seen: list[str] = []
    server = socket.create_server(("127.0.0.1", 0))

    def proxy() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            seen.append(data.split(b"\r\n", 1)[0].decode())
            body = b'{"dockerhub": []}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
    client = CybeDefendClient(settings("api_key", api_url="http://cybedefend.invalid"), Sensitive(API_KEY), Metrics())
    try:
        assert client.all_credentials(ORG) == []
    finally:
        client.close()
        server.close()
        thread.join(5)
    path = f"/integrations/container-registry/organization/{ORG}/credentials"
    assert seen == [f"GET http://cybedefend.invalid{path} HTTP/1.1"]


def test_a_listing_keeps_every_credential_with_an_id_and_counts_the_rest_in_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    from bridge.cybedefend.api import ALL_CREDENTIALS, credential_list
    from bridge.model import RemoteCredential

    body = {"items": [
        {"id": "c1", "dockerhubUsername": "u1", "description": "d1", "createdAt": "2026-01-01T00:00:00Z"},
        {"id": "", "dockerhubUsername": "nobody"},
        {"id": "c2", "dockerhubDetails": {"dockerhubUsername": "u2"}, "description": 7},
        "not an object",
        {"id": "c3", "name": "u3"},
        {"id": "c4", "dockerhubUsername": None, "createdAt": 5},
    ]}
    with caplog.at_level(logging.DEBUG):
        got = credential_list(ALL_CREDENTIALS, body)
    assert got == [RemoteCredential("c1", "u1", "d1", "2026-01-01T00:00:00Z"), RemoteCredential("c2", "u2"),
                   RemoteCredential("c3", "u3"), RemoteCredential("c4", "")]
    skipped = [r for r in caplog.records if "cybedefend_list_item_skipped" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in skipped]  # one line per listing, not one per item
    assert "count" in skipped[0].getMessage() and "2" in skipped[0].getMessage().partition("count")[2]
