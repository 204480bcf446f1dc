"""
The admin API in memory: StubTreq against the Klein resource, over a
registry and ports on a MemoryReactorClock.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from proxymap.admin.api import AdminAPI
from proxymap.config import Secret
from proxymap.sessions import EndReason

from .helpers import FUZZ_EXAMPLES, PORT, Harness

URL = "http://admin.test"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Admin:
    def __init__(self, users: tuple[tuple[str, Secret], ...] = ()) -> None:
        self.h = Harness()
        self.api = AdminAPI(self.h.registry, self.h.factories, users)
        self.treq = StubTreq(self.api.app.resource())
        self.auth: tuple[str, str] | None = None

    async def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, **kw: Any
    ) -> tuple[int, Any, Any]:
        if self.auth is not None:
            kw.setdefault("auth", self.auth)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await self.treq.request(method, URL + path, data=data, **kw)
        content = await response.content()
        parsed = json.loads(content) if content else None
        if parsed is not None:
            assert response.headers.getRawHeaders("content-type") == ["application/json"]
        return response.code, parsed, response.headers

    def proxied(self, port: int = PORT) -> Any:
        """
        A client connection with one completed request and its upstream leg.
        """
        proto, client = self.h.client(port)
        proto.dataReceived(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        up, upstream = self.h.upstream()
        up.dataReceived(OK)
        return proto, client, upstream


@pytest.fixture
def admin() -> Admin:
    return Admin()


@pytest_twisted.ensureDeferred
async def test_sessions_list_and_get(admin: Admin) -> None:
    assert (await admin.call("GET", "/sessions"))[:2] == (200, [])
    _, _, upstream = admin.proxied()
    session = admin.h.registry.peek(PORT)
    code, body, _ = await admin.call("GET", "/sessions")
    assert code == 200
    (item,) = body
    assert item == {
        "id": session.id,
        "port": PORT,
        "mapping": "vendor-a",
        "state": "active",
        "upstream": "gw.example.com:10000",
        "user": f"alice-session-{session.id}",
        "params": {},
        "created": "Thu, 01 Jan 1970 00:00:00 GMT",
        "expires": "Thu, 01 Jan 1970 00:10:00 GMT",
        "idle": 0.0,
        "connections": 1,
        "statistics": {
            "requests": 1,
            "connections_total": 1,
            "bytes_to_upstream": len(upstream.value()),
            "bytes_from_upstream": len(OK),
        },
    }
    assert (await admin.call("GET", f"/sessions/{session.id}"))[1] == item
    admin.h.reactor.advance(7)
    assert (await admin.call("GET", f"/sessions/{session.id}"))[1]["idle"] == 7


@pytest_twisted.ensureDeferred
async def test_no_secret_in_any_answer(admin: Admin) -> None:
    admin.proxied()
    for path in ("/sessions", "/ports", f"/ports/{PORT}", "/openapi.json"):
        code, body, _ = await admin.call("GET", path)
        assert code == 200 and "s3cret" not in json.dumps(body)


@pytest_twisted.ensureDeferred
async def test_fields_and_range(admin: Admin) -> None:
    for port in (10201, 10202, 10203):
        admin.h.registry.current(port)
    code, body, _ = await admin.call("GET", "/sessions?fields=port,idle")
    assert code == 200 and [set(item) for item in body] == [{"id", "port", "idle"}] * 3
    code, body, _ = await admin.call("GET", "/sessions?range=1-2&fields=port")
    assert [item["port"] for item in body] == [10202, 10203]
    assert (await admin.call("GET", "/sessions?range=5-9"))[1] == []
    assert (await admin.call("GET", "/ports?fields=session"))[1][0].keys() == {"port", "session"}
    for bad in (
        "fields=nope",
        "fields=",
        "range=1",
        "range=a-b",
        "port=x",
        "port=70000",
        "state=closing",
        "feilds=port",
    ):
        code, body, _ = await admin.call("GET", f"/sessions?{bad}")
        assert code == 400, bad
        assert body["error"] == "bad request" and body["description"]


@pytest_twisted.ensureDeferred
async def test_port_and_state_filters(admin: Admin) -> None:
    admin.proxied(10201)
    a = admin.h.registry.peek(10201)
    b = admin.h.registry.current(10202)
    body = (await admin.call("GET", "/sessions?port=10201"))[1]
    assert [item["id"] for item in body] == [a.id]
    assert [i["id"] for i in (await admin.call("GET", "/sessions?state=active"))[1]] == [a.id]
    assert [i["id"] for i in (await admin.call("GET", "/sessions?state=idle"))[1]] == [b.id]


@pytest_twisted.ensureDeferred
async def test_unknown_session_is_json_404(admin: Admin) -> None:
    for method, path in (
        ("GET", "/sessions/nope"),
        ("GET", "/sessions/nope/connections"),
        ("DELETE", "/sessions/nope"),
    ):
        code, body, _ = await admin.call(method, path)
        assert code == 404 and body["error"] == "not found"


@pytest_twisted.ensureDeferred
async def test_routing_errors_are_json(admin: Admin) -> None:
    code, body, _ = await admin.call("GET", "/nowhere")
    assert code == 404 and body == {
        "error": "not found",
        "description": "no such resource: /nowhere (GET /openapi.json lists them)",
    }
    code, body, headers = await admin.call("PATCH", "/sessions")
    assert code == 405 and body["error"] == "method not allowed"
    assert "GET" in headers.getRawHeaders("allow")[0]


@pytest_twisted.ensureDeferred
async def test_connections_of_a_session(admin: Admin) -> None:
    proto, _, upstream = admin.proxied()
    session = admin.h.registry.peek(PORT)
    code, body, _ = await admin.call("GET", f"/sessions/{session.id}/connections")
    assert code == 200
    assert body == [
        {
            "id": proto.id,
            "state": "idle",
            "client": "127.0.0.1:50000",
            "target": "example.com:80",
            "upstream": "gw.example.com:10000",
            "connected": "Thu, 01 Jan 1970 00:00:00 GMT",
            "idle": 0.0,
            "statistics": {
                "reads": 1,
                "writes": 1,  # head and body in one write
                "bytes_in": len(upstream.value()),
                "bytes_out": len(OK),
                "requests": 1,
            },
        }
    ]
    fields = (await admin.call("GET", f"/sessions/{session.id}/connections?fields=client"))[1]
    assert fields == [{"id": proto.id, "client": "127.0.0.1:50000"}]


@pytest_twisted.ensureDeferred
async def test_delete_closes_connections_and_session(admin: Admin) -> None:
    _, client, upstream = admin.proxied()
    session = admin.h.registry.peek(PORT)
    code, body, _ = await admin.call("DELETE", f"/sessions/{session.id}")
    assert (code, body) == (204, None)
    assert session.ended is EndReason.CLOSED
    assert client.disconnected and upstream.disconnected
    assert admin.h.registry.peek(PORT) is None
    assert (await admin.call("GET", f"/sessions/{session.id}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_delete_with_grace(admin: Admin) -> None:
    """
    With ?ttl= the session is gone at once (new requests get a new one, the
    API no longer shows it) while its connections may finish for ttl seconds.
    """
    _, client, upstream = admin.proxied()
    session = admin.h.registry.peek(PORT)
    assert (await admin.call("DELETE", f"/sessions/{session.id}?ttl=30"))[0] == 204
    assert session.ended is EndReason.CLOSED
    assert admin.h.registry.peek(PORT) is None
    assert (await admin.call("GET", f"/sessions/{session.id}"))[0] == 404
    assert (await admin.call("GET", "/sessions"))[1] == []
    assert not client.disconnected
    admin.h.reactor.advance(29)
    assert not client.disconnected
    admin.h.reactor.advance(1)
    assert client.disconnected and upstream.disconnected
    assert (await admin.call("DELETE", f"/sessions/{session.id}?ttl=-1"))[0] == 400
    assert (await admin.call("DELETE", f"/sessions/{session.id}?ttl=x"))[0] == 400


@pytest_twisted.ensureDeferred
async def test_delete_again_during_grace_closes_now(admin: Admin) -> None:
    _, client, _ = admin.proxied()
    session = admin.h.registry.peek(PORT)
    await admin.call("DELETE", f"/sessions/{session.id}?ttl=30")
    assert (await admin.call("DELETE", f"/sessions/{session.id}"))[0] == 204
    assert client.disconnected
    grace = [c for c in admin.h.reactor.getDelayedCalls() if c.func == admin.api._grace_over]
    assert grace == []
    assert (await admin.call("DELETE", f"/sessions/{session.id}"))[0] == 404


# ---------------------------------------------------------------- release


@pytest_twisted.ensureDeferred
async def test_release_by_port_whatever_the_id(admin: Admin) -> None:
    _, client, _ = admin.proxied()
    session = admin.h.registry.peek(PORT)
    code, body, _ = await admin.call("PUT", "/sessions/release", {"data": [{"port": PORT}]})
    assert code == 200
    assert body == {"success": True, "released": [{"port": PORT, "sessionId": session.id}]}
    assert session.ended is EndReason.RELEASED and client.disconnected


@pytest_twisted.ensureDeferred
async def test_release_by_port_and_session_id(admin: Admin) -> None:
    session = admin.h.registry.current(PORT)
    body = (
        await admin.call(
            "PUT", "/sessions/release", {"data": [{"port": PORT, "sessionId": "someone-else"}]}
        )
    )[1]
    assert body == {"success": True, "released": []}
    assert session.live
    body = (
        await admin.call(
            "PUT", "/sessions/release", {"data": [{"port": PORT, "sessionId": session.id}]}
        )
    )[1]
    assert body["released"] == [{"port": PORT, "sessionId": session.id}]
    assert not session.live


@pytest_twisted.ensureDeferred
async def test_release_several_ports(admin: Admin) -> None:
    a, b, c = (admin.h.registry.current(p) for p in (10201, 10202, 10203))
    body = (
        await admin.call(
            "PUT",
            "/sessions/release",
            {"data": [{"port": 10201}, {"port": 10202}, {"port": 10202}]},
        )
    )[1]
    assert [r["port"] for r in body["released"]] == [10201, 10202]
    assert not a.live and not b.live and c.live


@pytest_twisted.ensureDeferred
async def test_release_all_and_by_mapping(admin: Admin) -> None:
    sessions = [admin.h.registry.current(p) for p in (10201, 10202, 10203)]
    code, body, _ = await admin.call("PUT", "/sessions/release/nope", {"releaseAll": True})
    assert code == 404 and body["success"] is False
    assert all(s.live for s in sessions)
    body = (
        await admin.call(
            "PUT", "/sessions/release/vendor-a", {"releaseAll": True, "data": [{"port": 10201}]}
        )
    )[1]
    assert len(body["released"]) == 3
    assert not any(s.live for s in sessions)
    assert all(s.ended is EndReason.RELEASED for s in sessions)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"data": null}',
        b'{"data": []}',
        b'{"data": [{"port": "10201"}]}',
        b'{"data": [{"port": 10201}, {"port": 70000}]}',
        b'{"data": [{"port": 10201, "x": 1}]}',
        b'{"releaseAll": "yes"}',
        b'{"data": [{"port": 10201, "sessionId": null}]}',
        b'{"data": [{"port": 10201, "sessionId": 5}]}',
        b'{"extra": 1}',
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_release_releases_nothing(admin: Admin, body: bytes) -> None:
    session = admin.h.registry.current(PORT)
    code, answer, _ = await admin.call("PUT", "/sessions/release", raw=body)
    assert code == 400
    assert answer["success"] is False and answer["error"] == "bad request"
    assert session.live


@pytest_twisted.ensureDeferred
async def test_release_of_nothing(admin: Admin) -> None:
    """
    A body that asks for nothing, or names a port with no session of ours
    (outside the mapping too), releases nothing and says so.
    """
    session = admin.h.registry.current(PORT)
    for body in ({}, {"releaseAll": False}, {"data": [{"port": 9}]}):
        code, answer, _ = await admin.call("PUT", "/sessions/release", body)
        assert (code, answer) == (200, {"success": True, "released": []}), body
    assert session.live


# ---------------------------------------------------------------- ports


@pytest_twisted.ensureDeferred
async def test_ports(admin: Admin) -> None:
    admin.proxied()
    session = admin.h.registry.peek(PORT)
    body = (await admin.call("GET", "/ports"))[1]
    assert [item["port"] for item in body] == [10201, 10202, 10203]
    assert body[0] == {
        "port": PORT,
        "bind": "127.0.0.1",
        "mapping": "vendor-a",
        "upstream": "gw.example.com:10000",
        "session": session.id,
        "connections": 1,
    }
    assert body[1]["session"] is None
    assert (await admin.call("GET", f"/ports/{PORT}"))[1] == body[0]
    assert (await admin.call("GET", "/ports/1"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_port_session_new_and_reset(admin: Admin) -> None:
    old = admin.h.registry.current(PORT)
    code, body, _ = await admin.call("POST", f"/ports/{PORT}/session/new")
    new = admin.h.registry.peek(PORT)
    assert code == 200 and body["id"] == new.id != old.id
    assert old.ended is EndReason.RENEWED
    code, body, _ = await admin.call("POST", f"/ports/{PORT}/session/reset")
    assert body == {"success": True, "ended_session_id": new.id}
    assert admin.h.registry.peek(PORT) is None
    assert (await admin.call("POST", "/ports/1/session/new"))[0] == 404
    assert (await admin.call("GET", f"/ports/{PORT}/session/new"))[0] == 405


@pytest_twisted.ensureDeferred
async def test_openapi_document_names_every_route(admin: Admin) -> None:
    code, doc, _ = await admin.call("GET", "/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    routes = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for rule in admin.api.app.url_map.iter_rules()
    }
    assert routes == set(doc["paths"])


# ---------------------------------------------------------------- auth


@pytest_twisted.ensureDeferred
async def test_basic_auth() -> None:
    admin = Admin(users=(("ops", Secret("pa55word")), ("ci", Secret("other"))))
    code, body, headers = await admin.call("GET", "/sessions")
    assert code == 401 and body["error"] == "unauthorized"
    assert headers.getRawHeaders("www-authenticate") == ['Basic realm="proxymap admin"']
    for wrong in (("ops", "other"), ("ci", "pa55word"), ("nobody", "pa55word")):
        assert (await admin.call("GET", "/sessions", auth=wrong))[0] == 401
    assert (await admin.call("GET", "/sessions", auth=("ops", "pa55word")))[0] == 200
    assert (await admin.call("DELETE", "/sessions/x", auth=("ci", "nope")))[0] == 401
    code, doc, _ = await admin.call("GET", "/openapi.json", auth=("ci", "other"))
    assert doc["security"] == [{"basic": []}] and "pa55word" not in json.dumps(doc)


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_json_500_and_logged(
    admin: Admin, logged_failures: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(port: int) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(admin.h.registry, "peek", broken)
    code, body, _ = await admin.call("GET", "/ports")
    assert code == 500 and body["error"] == "internal error"
    assert "bug" not in json.dumps(body)
    assert len(logged_failures.expect(ZeroDivisionError)) == 1


@pytest_twisted.ensureDeferred
async def test_port_session_new_with_parameters() -> None:
    admin = Admin()
    admin.h = Harness(
        session_params={"country": "us"},
        username="{user}[-country-{country}]-session-{session}",
    )
    admin.api = AdminAPI(admin.h.registry, admin.h.factories)
    admin.treq = StubTreq(admin.api.app.resource())
    code, body, _ = await admin.call("POST", f"/ports/{PORT}/session/new", {"country": "de"})
    assert code == 200 and body["params"] == {"country": "de"}
    assert body["user"] == f"alice-country-de-session-{body['id']}"
    before = admin.h.registry.peek(PORT)
    for bad in ({"city": "x"}, {"country": "d e"}, {"country": 5}, ["de"]):
        code, _, _ = await admin.call("POST", f"/ports/{PORT}/session/new", bad)
        assert code == 400, bad
    assert (await admin.call("POST", f"/ports/{PORT}/session/new", raw=b"{"))[0] == 400
    assert admin.h.registry.peek(PORT) is before  # unchanged by the bad requests
    code, body, _ = await admin.call("POST", f"/ports/{PORT}/session/new")
    assert body["params"] == {"country": "us"}
    doc = (await admin.call("GET", "/openapi.json"))[1]
    schema = doc["paths"]["/ports/{port}/session/new"]["post"]["requestBody"]["content"]
    assert list(schema["application/json"]["schema"]["properties"]) == ["country"]


@pytest.mark.parametrize("path", ["/sessions/%2F", "/sessions//", "/ports//10201"])
@pytest_twisted.ensureDeferred
async def test_a_path_with_an_empty_segment_is_a_404(admin: Admin, path: str) -> None:
    code, body, _ = await admin.call("GET", path)
    assert code == 404 and body["error"] == "not found"


_SEGMENTS = st.sampled_from(
    ["sessions", "ports", "release", "session", "new", "reset", "connections", "metrics",
     "health", "openapi.json", "vendor-a", "sess0001", str(PORT), "0", "-1", "99999999999",
     "%00", "%ff", "%2F", "..", "", "\u00e9", "a" * 300]
) | st.text(max_size=12)  # fmt: skip
_QUERY = st.dictionaries(
    st.sampled_from(["fields", "range", "port", "state", "ttl", "x"]) | st.text(max_size=6),
    st.sampled_from(["", "id", "id,port", "[0,1]", "[1,0]", "[0,99999999999]", "-1", "nan",
                     "1e400", "active", "[a,b]", "0", "600", "%00"]) | st.text(max_size=12),
    max_size=3,
)  # fmt: skip
_BODIES = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["ports", "sessions", "ids", "all", "ttl", "mapping"]),
                inner,
                max_size=3,
            )
        ),
        max_leaves=6,
    ).map(lambda value: json.dumps(value).encode()),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    st.lists(_SEGMENTS, min_size=1, max_size=4),
    _QUERY,
    _BODIES,
)
def test_any_request_gets_an_answer_not_an_internal_error(
    method: str, segments: list[str], query: dict[str, str], body: bytes | None
) -> None:
    """
    Whatever an operator's script sends, the answer is a success or a 4xx
    in JSON saying what is wrong, never a 500 (a bug's traceback in the log).
    """
    admin = Admin()
    admin.proxied()  # a live session with a connection, for the paths that name one
    path = "/" + "/".join(quote(segment, safe="%") for segment in segments)
    answered: list[Any] = []
    with capturedLogs() as events:
        admin.treq.request(method, URL + path, params=query, data=body).addBoth(answered.append)
        admin.treq.flush()
    (response,) = answered
    assert not isinstance(response, Failure), response
    assert response.code < 500, (path, query, body, [e.get("log_failure") for e in events])
