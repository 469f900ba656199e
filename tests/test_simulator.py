"""Contract tests of the CybeDefend double, over real HTTP with httpx."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.model import Sensitive
from cybedefend_double.routes import load_contract, validator_for
from cybedefend_double.simulator import Fault, Simulator

ORG = "11111111-1111-4111-8111-111111111111"
OTHER_ORG = "99999999-9999-4999-8999-999999999999"
P1 = "22222222-2222-4222-8222-222222222222"
P2 = "33333333-3333-4333-8333-333333333333"
P_OTHER = "44444444-4444-4444-8444-444444444444"  # belongs to OTHER_ORG
UNKNOWN = "55555555-5555-4555-8555-555555555555"
PAT = "cdpat_manage_7f3c1e9a0b2d4c6e8f10"
READ_PAT = "cdpat_read_1a2b3c4d5e6f7a8b9c0d"
API_KEY = "cdkey_legacy_0f1e2d3c4b5a69788796"
DH_TOKEN = "dckr_pat_Zq8wX1vY2uT3sR4qP5oN6mL7"
SECRETS = (PAT, READ_PAT, API_KEY, DH_TOKEN)

DH = "/integrations/dockerhub/container-registry"
CR = "/integrations/container-registry"
CREATE = f"{DH}/organization/{ORG}/credentials"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
PAT_TYPE = "urn:logto:token-type:personal_access_token"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def __call__(self) -> float:
        return self.now


def response_validator(path: str, method: str, status: str) -> Any:
    schema = load_contract()["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return validator_for(schema)


def assert_valid(path: str, method: str, status: str, document: Any) -> None:
    errors = [e.message for e in response_validator(path, method, status).iter_errors(document)]
    assert errors == []


def assert_error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    body: dict[str, Any] = response.json()
    assert set(body) >= {"message", "statusCode", "timestamp", "path"}
    assert body["statusCode"] == status
    assert body["path"] == response.request.url.path
    assert body["timestamp"].endswith("Z")
    return body


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Simulator]:
    s = Simulator(clock=clock, token_ttl_seconds=600)
    s.add_organization(ORG)
    s.add_project(ORG, P1)
    s.add_project(ORG, P2)
    s.add_organization(OTHER_ORG)
    s.add_project(OTHER_ORG, P_OTHER)
    s.add_pat(PAT, {ORG: "manage"})
    s.add_pat(READ_PAT, {ORG: "read"})
    s.add_api_key(API_KEY, {ORG: "manage"})
    with s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        yield c


def exchange(client: httpx.Client, sim: Simulator, pat: str = PAT, **override: str) -> httpx.Response:
    form = {"grant_type": GRANT, "client_id": sim.client_app_id, "subject_token": pat,
            "subject_token_type": PAT_TYPE, "resource": sim.url}
    form.update(override)
    return client.post("/oidc/token", data=form)


def bearer(client: httpx.Client, sim: Simulator, pat: str = PAT) -> dict[str, str]:
    response = exchange(client, sim, pat)
    assert response.status_code == 200
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def create(client: httpx.Client, headers: dict[str, str], project: str = P1, **extra: Any) -> httpx.Response:
    body = {"projectId": project, "dockerhubUsername": "acme", "accessToken": DH_TOKEN, **extra}
    return client.post(CREATE, json=body, headers=headers)


def links_path(cred_id: str, org: str = ORG, registry: str = "dockerhub") -> str:
    return f"{CR}/organization/{org}/credentials/{registry}/{cred_id}/projects"


# ----- auth -------------------------------------------------------------------------------------
def test_client_apps_shape(client: httpx.Client, sim: Simulator) -> None:
    response = client.get("/client-apps")
    assert response.status_code == 200
    assert_valid("/client-apps", "get", "200", response.json())
    assert response.json()["cli"]["appId"] == sim.client_app_id


def test_pat_exchange_issues_a_working_bearer_token(client: httpx.Client, sim: Simulator) -> None:
    response = exchange(client, sim)
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600 and "scope" in body
    assert body["access_token"] not in SECRETS
    listed = client.get(f"{DH}/project/{P1}/credentials", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert listed.status_code == 200 and listed.json() == []


def test_exchange_with_another_app_is_not_allowed(client: httpx.Client, sim: Simulator) -> None:
    vscode = client.get("/client-apps").json()["vscode"]["appId"]
    for app in (vscode, "some-unknown-app"):
        response = exchange(client, sim, client_id=app)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
        assert "token_exchange_not_allowed" in response.json()["error_description"]


def test_exchange_rejects_unknown_and_revoked_pats(client: httpx.Client, sim: Simulator) -> None:
    assert exchange(client, sim, pat="cdpat_nobody_knows_this_one").status_code == 401
    assert exchange(client, sim).status_code == 200
    sim.revoke_pat(PAT)
    revoked = exchange(client, sim)
    assert revoked.status_code == 401 and revoked.json()["error"] == "invalid_grant"
    assert exchange(client, sim, pat=READ_PAT).status_code == 200  # only that PAT is revoked


@pytest.mark.parametrize(("override", "error"), [
    ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
    ({"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "invalid_request"),
    ({"subject_token": ""}, "invalid_request"),
    ({"resource": "https://api-eu.cybedefend.com"}, "invalid_target"),
])
def test_exchange_rejects_malformed_forms(client: httpx.Client, sim: Simulator, override: dict[str, str],
                                          error: str) -> None:
    response = exchange(client, sim, **override)
    assert response.status_code == 400 and response.json()["error"] == error


def test_exchange_requires_a_form_body(client: httpx.Client, sim: Simulator) -> None:
    response = client.post("/oidc/token", json={"grant_type": GRANT, "client_id": sim.client_app_id,
                                                "subject_token": PAT, "subject_token_type": PAT_TYPE})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


def test_bearer_expires_with_the_injected_clock(client: httpx.Client, sim: Simulator, clock: FakeClock) -> None:
    headers = bearer(client, sim)
    clock.now += 599
    assert client.get(f"{DH}/project/{P1}/credentials", headers=headers).status_code == 200
    clock.now += 1
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials", headers=headers), 401)
    assert client.get(f"{DH}/project/{P1}/credentials", headers=bearer(client, sim)).status_code == 200


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer not-a-token-we-issued"}, {"Authorization": "Basic dXNlcjpwYXNz"},
])
def test_missing_or_bad_bearer_is_401(client: httpx.Client, headers: dict[str, str]) -> None:
    body = assert_error_body(client.get(f"{DH}/project/{P1}/credentials", headers=headers), 401)
    assert body["message"] == "Unauthorized"


def test_api_key_is_gone_by_default(client: httpx.Client) -> None:
    body = assert_error_body(create(client, {"x-api-key": API_KEY}), 410)
    assert "personal access token" in body["message"]


def test_api_key_accepted_when_switched_on(client: httpx.Client, sim: Simulator) -> None:
    sim.api_keys_gone = False
    assert create(client, {"x-api-key": API_KEY}).status_code == 201
    assert_error_body(create(client, {"x-api-key": "cdkey_not_a_known_key_at_all"}), 401)
    sim.api_keys_gone = True
    assert_error_body(create(client, {"x-api-key": API_KEY}), 410)
    assert len(sim.credentials()) == 1


# ----- endpoints --------------------------------------------------------------------------------
def test_create_shape_and_storage(client: httpx.Client, sim: Simulator, clock: FakeClock) -> None:
    response = create(client, bearer(client, sim), description="[cybedefend-bridge:x:0123456789ab:v1]")
    assert response.status_code == 201
    body = response.json()
    assert_valid(f"{DH}/organization/{{organizationId}}/credentials", "post", "201", body)
    assert body["registryUrl"] == "https://index.docker.io/v1/"
    assert body["createdAt"] == "2026-01-01T00:00:00.000Z"
    assert body["description"] == "[cybedefend-bridge:x:0123456789ab:v1]"
    assert DH_TOKEN not in response.text and "accessToken" not in body
    (stored,) = sim.credentials(ORG)
    assert stored.id == body["id"] and stored.username == "acme" and stored.linked_projects == {P1}
    assert stored.token == Sensitive(DH_TOKEN)
    assert sim.credentials(OTHER_ORG) == []


def test_create_without_description_omits_it(client: httpx.Client, sim: Simulator) -> None:
    body = create(client, bearer(client, sim)).json()
    assert "description" not in body


def test_same_body_twice_makes_two_credentials(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    first, second = create(client, headers).json(), create(client, headers).json()
    assert first["id"] != second["id"] and len(sim.credentials()) == 2


def test_list_returns_credentials_linked_to_the_project(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    one = create(client, headers, description="d1").json()["id"]
    create(client, headers, project=P2)
    response = client.get(f"{DH}/project/{P1}/credentials", headers=headers)
    assert response.status_code == 200
    assert_valid(f"{DH}/project/{{projectId}}/credentials", "get", "200", response.json())
    assert [item["id"] for item in response.json()] == [one]
    assert set(response.json()[0]) == {"id", "dockerhubUsername", "createdAt", "description"}  # no registryUrl
    assert DH_TOKEN not in response.text


def test_get_one(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    cred = create(client, headers).json()["id"]
    response = client.get(f"{DH}/project/{P1}/credentials/{cred}", headers=headers)
    assert response.status_code == 200
    assert_valid(f"{DH}/project/{{projectId}}/credentials/{{credentialId}}", "get", "200", response.json())
    assert response.json()["registryUrl"] == "https://index.docker.io/v1/" and DH_TOKEN not in response.text
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials/{UNKNOWN}", headers=headers), 404)
    assert_error_body(client.get(f"{DH}/project/{P2}/credentials/{cred}", headers=headers), 404)  # not linked


def test_delete_then_404(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    cred = create(client, headers).json()["id"]
    response = client.delete(f"{DH}/organization/{ORG}/credentials/{cred}", headers=headers)
    assert response.status_code == 204 and response.content == b""
    assert sim.credentials() == []
    assert_error_body(client.delete(f"{DH}/organization/{ORG}/credentials/{cred}", headers=headers), 404)


def test_delete_in_the_wrong_org_is_404_not_a_delete(client: httpx.Client, sim: Simulator) -> None:
    sim.add_pat("cdpat_both_orgs_9a8b7c6d5e4f", {ORG: "manage", OTHER_ORG: "manage"})
    headers = bearer(client, sim, "cdpat_both_orgs_9a8b7c6d5e4f")
    cred = create(client, headers).json()["id"]
    assert_error_body(client.delete(f"{DH}/organization/{OTHER_ORG}/credentials/{cred}", headers=headers), 404)
    assert len(sim.credentials()) == 1


def test_links_get_and_replace(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    cred = create(client, headers).json()["id"]
    assert client.get(links_path(cred), headers=headers).json() == {"projectIds": [P1]}
    response = client.put(links_path(cred), json={"projectIds": [P2, P1, P2]}, headers=headers)
    assert response.status_code == 200 and response.json() == {"projectIds": [P2, P1]}
    assert client.get(links_path(cred), headers=headers).json() == {"projectIds": [P2, P1]}
    assert [c["id"] for c in client.get(f"{DH}/project/{P2}/credentials", headers=headers).json()] == [cred]
    assert client.put(links_path(cred), json={"projectIds": []}, headers=headers).json() == {"projectIds": []}
    assert sim.credentials()[0].linked_projects == frozenset()
    assert_error_body(client.get(links_path(UNKNOWN), headers=headers), 404)
    assert_error_body(client.put(links_path(UNKNOWN), json={"projectIds": [P1]}, headers=headers), 404)
    assert_error_body(client.get(links_path(cred, registry="gitlab"), headers=headers), 404)
    assert_error_body(client.get(links_path(cred, registry="floppy"), headers=headers), 400)


def test_links_as_bare_array(clock: FakeClock) -> None:
    with Simulator(clock=clock, links_as_array=True) as s, httpx.Client(base_url=s.url, timeout=5) as c:
        s.add_organization(ORG)
        s.add_project(ORG, P1)
        s.add_pat(PAT, {ORG: "manage"})
        headers = bearer(c, s)
        cred = create(c, headers).json()["id"]
        assert c.get(links_path(cred), headers=headers).json() == [P1]


def test_links_to_projects_outside_the_org_or_forbidden_are_403(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    cred = create(client, headers).json()["id"]
    assert_error_body(client.put(links_path(cred), json={"projectIds": [P1, P_OTHER]}, headers=headers), 403)
    assert_error_body(client.put(links_path(cred), json={"projectIds": [UNKNOWN]}, headers=headers), 403)
    sim.forbid_project(P2)
    assert_error_body(client.put(links_path(cred), json={"projectIds": [P2]}, headers=headers), 403)
    assert sim.credentials()[0].linked_projects == {P1}  # a refused replace changes nothing


def test_all_credentials_of_an_org(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    first = create(client, headers, description="x").json()["id"]
    second = create(client, headers, project=P2).json()["id"]
    client.put(links_path(second), json={"projectIds": []}, headers=headers)
    response = client.get(f"{CR}/organization/{ORG}/credentials", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert_valid(f"{CR}/organization/{{organizationId}}/credentials", "get", "200", body)
    assert set(body) == {"github", "gitlab", "dockerhub", "acr", "gcr", "ecr", "quay", "harbor", "jfrog", "scaleway"}
    by_id = {item["id"]: item for item in body["dockerhub"]}
    assert by_id[first]["projectId"] == P1 and by_id[first]["linkedProjectIds"] == [P1]
    assert by_id[first]["name"] == "acme" and by_id[first]["dockerhubDetails"] == {"dockerhubUsername": "acme"}
    assert by_id[second]["projectId"] == "" and by_id[second]["linkedProjectIds"] == []
    assert DH_TOKEN not in response.text
    other = client.get(f"{CR}/organization/{OTHER_ORG}/credentials", headers=headers)
    assert_error_body(other, 403)


def test_unknown_route_is_nest_style_404(client: httpx.Client) -> None:
    body = assert_error_body(client.get("/integrations/nothing-here"), 404)
    assert body["message"] == "Cannot GET /integrations/nothing-here"


# ----- validation -------------------------------------------------------------------------------
def test_missing_field_is_400_with_a_list(client: httpx.Client, sim: Simulator) -> None:
    response = client.post(CREATE, json={"projectId": P1, "dockerhubUsername": "acme"}, headers=bearer(client, sim))
    body = assert_error_body(response, 400)
    assert body["message"] == ["accessToken should not be empty", "accessToken must be a string"]
    assert sim.credentials() == []


def test_wrong_types_are_400(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    response = client.post(CREATE, json={"projectId": 7, "dockerhubUsername": "a", "accessToken": DH_TOKEN,
                                         "description": ["x"]}, headers=headers)
    body = assert_error_body(response, 400)
    assert body["message"] == ["description must be a string", "projectId must be a string"]
    assert DH_TOKEN not in response.text
    body = assert_error_body(client.post(CREATE, json=[1], headers=headers), 400)
    assert body["message"] == ["body must be an object"]
    cred = create(client, headers).json()["id"]
    body = assert_error_body(client.put(links_path(cred), json={"projectIds": [P1, 3]}, headers=headers), 400)
    assert body["message"] == ["each value in projectIds must be a string"]
    body = assert_error_body(client.put(links_path(cred), json={"projectIds": P1}, headers=headers), 400)
    assert body["message"] == ["projectIds must be an array"]


def test_body_without_json_content_type_or_malformed_is_400(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    raw = json.dumps({"projectId": P1, "dockerhubUsername": "a", "accessToken": DH_TOKEN}).encode()
    no_type = client.post(CREATE, content=raw, headers={**headers, "Content-Type": "text/plain"})
    assert isinstance(assert_error_body(no_type, 400)["message"], list)
    broken = client.post(CREATE, content=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert isinstance(assert_error_body(broken, 400)["message"], str)
    assert sim.credentials() == []


@pytest.mark.parametrize(("method", "path", "bad_param"), [
    ("POST", f"{DH}/organization/not-a-uuid/credentials", "organizationId"),
    ("DELETE", f"{DH}/organization/{ORG}/credentials/123", "credentialId"),
    ("GET", f"{DH}/project/p1/credentials", "projectId"),
    ("GET", f"{DH}/project/{P1}/credentials/xyz", "credentialId"),
    ("GET", f"{CR}/organization/org/credentials", "organizationId"),
    ("GET", f"{CR}/organization/{ORG}/credentials/dockerhub/abc/projects", "credentialId"),
    ("PUT", f"{CR}/organization/o/credentials/dockerhub/{UNKNOWN}/projects", "organizationId"),
])
def test_non_uuid_path_params_are_400(client: httpx.Client, sim: Simulator, method: str, path: str,
                                      bad_param: str) -> None:
    bodies: dict[str, Any] = {"POST": {"projectId": P1, "dockerhubUsername": "a", "accessToken": DH_TOKEN},
                              "PUT": {"projectIds": [P1]}}
    body = bodies.get(method)
    response = client.request(method, path, json=body, headers=bearer(client, sim))
    assert assert_error_body(response, 400)["message"] == [f"{bad_param} must be a UUID"]


# ----- permissions ------------------------------------------------------------------------------
def test_read_only_pat_can_list_but_not_write(client: httpx.Client, sim: Simulator) -> None:
    cred = create(client, bearer(client, sim)).json()["id"]
    reader = bearer(client, sim, READ_PAT)
    assert client.get(f"{DH}/project/{P1}/credentials", headers=reader).status_code == 200
    assert client.get(f"{DH}/project/{P1}/credentials/{cred}", headers=reader).status_code == 200
    assert client.get(f"{CR}/organization/{ORG}/credentials", headers=reader).status_code == 200
    assert_error_body(create(client, reader), 403)
    assert_error_body(client.delete(f"{DH}/organization/{ORG}/credentials/{cred}", headers=reader), 403)
    assert_error_body(client.get(links_path(cred), headers=reader), 403)
    assert_error_body(client.put(links_path(cred), json={"projectIds": [P1]}, headers=reader), 403)
    assert len(sim.credentials()) == 1


def test_forbidden_project_is_403_everywhere_it_is_named(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    cred = create(client, headers).json()["id"]
    sim.forbid_project(P1)
    assert_error_body(create(client, headers), 403)
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials", headers=headers), 403)
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials/{cred}", headers=headers), 403)
    assert create(client, headers, project=P2).status_code == 201
    sim.allow_project(P1)
    assert client.get(f"{DH}/project/{P1}/credentials", headers=headers).status_code == 200


def test_projects_and_orgs_outside_the_grant_are_403(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    assert_error_body(create(client, headers, project=P_OTHER), 403)  # project of another org
    assert_error_body(create(client, headers, project=UNKNOWN), 403)
    assert_error_body(client.get(f"{DH}/project/{P_OTHER}/credentials", headers=headers), 403)
    assert_error_body(client.get(f"{DH}/project/{UNKNOWN}/credentials", headers=headers), 403)
    body = {"projectId": P_OTHER, "dockerhubUsername": "a", "accessToken": DH_TOKEN}
    assert_error_body(client.post(f"{DH}/organization/{OTHER_ORG}/credentials", json=body, headers=headers), 403)
    assert_error_body(client.post(f"{DH}/organization/{UNKNOWN}/credentials", json=body, headers=headers), 403)
    assert sim.credentials() == []


# ----- faults -----------------------------------------------------------------------------------
def test_status_fault_with_retry_after(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    sim.inject("create", Fault.status(429, retry_after="7"))
    response = create(client, headers)
    assert assert_error_body(response, 429)["message"] == "Too Many Requests"
    assert response.headers["Retry-After"] == "7"
    assert sim.credentials() == []
    assert create(client, headers).status_code == 201  # times=1: the next one is normal


def test_status_fault_without_retry_after_and_times(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    sim.inject("list", Fault.status(503), times=2)
    assert sim.pending_faults() == 2
    assert create(client, headers).status_code == 201  # another endpoint is untouched
    for _ in range(2):
        response = client.get(f"{DH}/project/{P1}/credentials", headers=headers)
        assert_error_body(response, 503)
        assert "Retry-After" not in response.headers
    assert sim.pending_faults() == 0
    assert client.get(f"{DH}/project/{P1}/credentials", headers=headers).status_code == 200


def test_wildcard_fault_hits_any_endpoint_in_order(client: httpx.Client, sim: Simulator) -> None:
    sim.inject("*", Fault.status(502), times=2)
    sim.inject("client_apps", Fault.status(500))
    assert client.get("/client-apps").status_code == 502
    assert exchange(client, sim).status_code == 502
    assert client.get("/client-apps").status_code == 500
    assert client.get("/client-apps").status_code == 200


def test_delay_fault_sleeps_then_handles(client: httpx.Client, sim: Simulator,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    headers = bearer(client, sim)
    sim.inject("create", Fault.delay(0.3))
    started = time.monotonic()
    assert create(client, headers).status_code == 201
    assert time.monotonic() - started >= 0.3
    sim.inject("list", Fault.delay(0.3))
    with pytest.raises(httpx.ReadTimeout):
        client.get(f"{DH}/project/{P1}/credentials", headers=headers, timeout=0.05)
    time.sleep(0.4)  # the server answers a client that has gone: that must stay quiet
    assert [r.status for r in sim.requests if r.endpoint == "list"] == [200]
    assert capfd.readouterr().err == ""


def test_constructor_switches(clock: FakeClock) -> None:
    with Simulator(clock=clock, client_app_id="my-cli", expected_resource="https://api-eu.cybedefend.com",
                   token_ttl_seconds=30, id_factory=lambda: UNKNOWN) as s, \
            httpx.Client(base_url=s.url, timeout=5) as c:
        s.add_organization(ORG)
        s.add_project(ORG, P1)
        s.add_pat(PAT, {ORG: "manage"})
        assert c.get("/client-apps").json()["cli"]["appId"] == "my-cli"
        assert exchange(c, s).status_code == 400  # resource is the simulator's URL, not the expected one
        token = exchange(c, s, resource="https://api-eu.cybedefend.com/")
        assert token.status_code == 200 and token.json()["expires_in"] == 30
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        assert create(c, headers).json()["id"] == UNKNOWN


def test_drop_before_does_not_create(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    sim.inject("create", Fault.drop_before())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        create(client, headers)
    assert sim.credentials() == []
    assert create(client, headers).status_code == 201  # the client reconnects and the next call works


def test_drop_after_really_creates(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)
    sim.inject("create", Fault.drop_after())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        create(client, headers, description="marker-1")
    (stored,) = sim.credentials()
    assert stored.description == "marker-1"
    listed = client.get(f"{DH}/project/{P1}/credentials", headers=headers).json()
    assert [item["id"] for item in listed] == [stored.id]
    assert [(r.endpoint, r.status, r.fault) for r in sim.requests if r.endpoint == "create"] == [
        ("create", None, "drop_after")]


def test_expire_tokens_fault(client: httpx.Client, sim: Simulator) -> None:
    old = bearer(client, sim)
    sim.inject("list", Fault.expire_tokens())
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials", headers=old), 401)
    assert_error_body(client.get(f"{DH}/project/{P1}/credentials", headers=old), 401)  # stays invalid
    assert client.get(f"{DH}/project/{P1}/credentials", headers=bearer(client, sim)).status_code == 200


def test_fault_on_token_exchange(client: httpx.Client, sim: Simulator) -> None:
    sim.inject("token_exchange", Fault.status(503, retry_after="Wed, 21 Oct 2026 07:28:00 GMT"))
    response = exchange(client, sim)
    assert response.status_code == 503 and response.headers["Retry-After"].endswith("GMT")
    assert exchange(client, sim).status_code == 200


def test_inject_rejects_bad_arguments(sim: Simulator) -> None:
    with pytest.raises(ValueError):
        sim.inject("update", Fault.status(500))
    with pytest.raises(ValueError):
        sim.inject("create", Fault.status(500), times=0)
    with pytest.raises(ValueError):
        Fault.status(42)
    with pytest.raises(ValueError):
        Fault.delay(-1)


# ----- recording, secrets, robustness -----------------------------------------------------------
def test_requests_are_recorded_without_secrets(client: httpx.Client, sim: Simulator,
                                               capfd: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    sim.reset_requests()
    client.get("/client-apps")
    token_response = exchange(client, sim)
    access_token = token_response.json()["access_token"]
    headers = {"Authorization": f"Bearer {access_token}"}
    sim.inject("list", Fault.status(429))
    create(client, headers)
    client.get(f"{DH}/project/{P1}/credentials", headers=headers)
    client.get(f"{DH}/project/{P1}/credentials", headers={"x-api-key": API_KEY})
    records = sim.requests
    assert [(r.method, r.endpoint, r.status, r.auth, r.fault) for r in records] == [
        ("GET", "client_apps", 200, None, None),
        ("POST", "token_exchange", 200, None, None),
        ("POST", "create", 201, "bearer", None),
        ("GET", "list", 429, "bearer", "status"),
        ("GET", "list", 410, "api_key", None),
    ]
    assert records[1].body == {"grant_type": GRANT, "client_id": sim.client_app_id,
                               "subject_token_type": PAT_TYPE, "resource": sim.url}
    assert records[2].body == {"projectId": P1, "dockerhubUsername": "acme",
                               "accessToken_sha256": hashlib.sha256(DH_TOKEN.encode()).hexdigest()}
    assert records[2].path == CREATE and all(r.at == 1_767_225_600.0 for r in records)
    shown = repr(records) + repr(sim) + repr(sim.credentials()) + str(sim.credentials())
    captured = capfd.readouterr()
    for secret in (*SECRETS, access_token):
        assert secret not in shown
        assert secret not in captured.out + captured.err + caplog.text
    sim.reset_requests()
    assert sim.requests == []


def test_concurrent_creates_are_all_kept(client: httpx.Client, sim: Simulator) -> None:
    headers = bearer(client, sim)

    def post(_: int) -> int:
        return create(client, headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(post, range(200)))
    assert statuses == [201] * 200
    assert len({c.id for c in sim.credentials()}) == 200
    assert len([r for r in sim.requests if r.endpoint == "create"]) == 200


def test_stop_ends_keep_alive_connections(clock: FakeClock) -> None:
    s = Simulator(clock=clock)
    url = s.start()
    with httpx.Client(base_url=url, timeout=2) as c:
        assert c.get("/client-apps").status_code == 200  # leaves a pooled keep-alive connection
        s.stop()
        with pytest.raises(httpx.TransportError):
            c.get("/client-apps")
    assert "stopped" in repr(s)


def test_setup_validation(sim: Simulator) -> None:
    with pytest.raises(ValueError):
        sim.add_organization("acme")
    with pytest.raises(ValueError):
        sim.add_project(UNKNOWN, P1)
    with pytest.raises(ValueError):
        sim.add_project(OTHER_ORG, P1)  # already in ORG
    with pytest.raises(ValueError):
        sim.add_pat("cdpat_x_123456", {ORG: "admin"})
    with pytest.raises(KeyError):
        sim.revoke_pat("cdpat_never_added_0000")


def test_cli_runs_from_a_seed_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "pat.txt").write_text(PAT + "\n")
    seed = {"organizations": [{"id": ORG, "projects": [P1]}],
            "pats": [{"file": "pat.txt", "permissions": {ORG: "manage"}}], "token_ttl_seconds": 120}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "cybedefend_double", "--port", "0", "--seed",
                             str(tmp_path / "seed.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=5) as c:
            app = c.get("/client-apps").json()["cli"]["appId"]
            token = c.post("/oidc/token", data={"grant_type": GRANT, "client_id": app, "subject_token": PAT,
                                                "subject_token_type": PAT_TYPE, "resource": url})
            assert token.status_code == 200 and token.json()["expires_in"] == 120
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            assert create(c, headers).status_code == 201
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        for secret in SECRETS:
            assert secret not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_a_bad_seed(tmp_path: Path) -> None:
    (tmp_path / "seed.json").write_text(json.dumps({"pats": [{"file": "missing.txt"}]}))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "cybedefend_double", "--seed", str(tmp_path / "seed.json")],
                            capture_output=True, text=True, timeout=30, cwd=root)
    assert result.returncode == 2 and "missing.txt" in result.stderr


def test_context_manager_threads_do_not_linger(clock: FakeClock) -> None:
    before = threading.active_count()
    with Simulator(clock=clock) as s, httpx.Client(base_url=s.url, timeout=2) as c:
        assert c.get("/client-apps").status_code == 200
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= before
