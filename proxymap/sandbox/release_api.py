"""
The sandbox vendor's session-release API, shaped like Geonode's:

    PUT /sessions/release/{serviceType}
    Authorization: Basic <api user>:<api password>
    {"data": [{"port": 10200, "sessionId": "x1y2z3"}]}  or  {"releaseAll": true}

A released session id gets a new exit when it comes back.  Every call is
recorded (method, path, API user, body) so tests can see exactly what
proxymap sent.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from proxymap.credentials import parse_basic_authorization
from proxymap.sandbox.vendor import SandboxVendor


class ReleaseAPI(Resource):
    """
    ``/sessions/release/<serviceType>`` of the sandbox vendor.
    """

    isLeaf = True

    def __init__(self, vendor: SandboxVendor) -> None:
        super().__init__()
        self.vendor = vendor

    def _answer(self, request: Request, status: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def render_PUT(self, request: Request) -> bytes:
        vendor = self.vendor
        path = request.path.decode("utf-8", "replace")
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[:2] != ["sessions", "release"]:
            return self._answer(request, 404, {"success": False, "error": "not found"})
        header = request.getHeader(b"authorization")
        given = parse_basic_authorization(header) if header else None
        user, password = given if given is not None else ("", "")
        ok = hmac.compare_digest(user.encode(), vendor.api_user.encode())
        ok &= hmac.compare_digest(password.encode(), vendor.api_password.encode())
        if not ok:
            request.setHeader(b"www-authenticate", b'Basic realm="sandbox release API"')
            return self._answer(request, 401, {"success": False, "error": "unauthorized"})
        try:
            body = json.loads(request.content.read())  # type: ignore[union-attr]
        except ValueError:
            return self._answer(request, 400, {"success": False, "error": "not JSON"})
        vendor.release_calls.append({"method": "PUT", "path": path, "user": user, "body": body})
        if isinstance(body, dict) and body.get("releaseAll") is True:
            for session in list(vendor.exits):
                vendor.release(session)
        elif isinstance(body, dict) and isinstance(body.get("data"), list):
            for entry in body["data"]:
                if not isinstance(entry, dict) or not isinstance(entry.get("port"), int):
                    return self._answer(request, 400, {"success": False, "error": "bad entry"})
                session_id = entry.get("sessionId")
                if isinstance(session_id, str):
                    vendor.release(session_id)
                else:  # a whole port: every session the sandbox knows
                    for known in list(vendor.exits):
                        vendor.release(known)
        else:
            return self._answer(request, 400, {"success": False, "error": "bad body"})
        return self._answer(request, 200, {"success": True})
