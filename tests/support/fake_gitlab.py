#!/usr/bin/env python3
"""A scripted GitLab for discovery tests and the discovery benchmark: answers POST /api/graphql
in the shapes of GitLab's schema (`group(fullPath:)` with `securityPolicyProject`,
`descendantGroups(includeParentDescendants:, first:, after:)`, `projects(includeSubgroups:,
first:, after:)`, the instance's `groups` / `projects`; connections with `nodes` and
`pageInfo { hasNextPage endCursor }`; global ids `gid://gitlab/Group/N`), from a world file it
re-reads on every request, so a test changes links between two discoveries by rewriting it.

Usage: fake_gitlab.py WORLD.json CALLS.log   (prints the port it listens on, on 127.0.0.1)

World: {"token": "...", "mode": "up" | {"status": 503} | {"stall": 30},
        "groups": [{"path": "acme", "id": 1, "spp": "acme/policies" | null}, ...],
        "projects": [{"path": "acme/policies", "id": 9, "name": "Policies", "spp": null,
                      "http_url_to_repo": "...", "default_branch": "main" | null}, ...]}
Every request is logged to CALLS.log as one JSON line {"path", "auth_ok", "query_kind"}.

For sign-in tests it also answers, with a user's own token in PRIVATE-TOKEN, GitLab's REST
`GET /api/v4/user` (`doc/api/users.md`: `is_admin` only for administrators) and
`GET /api/v4/{groups,projects}/:id/members/all/:user_id` (`doc/api/members.md`, inherited
memberships included), from `"users": [{"token", "id", "username", "is_admin"}]` and
`"members": [{"namespace", "kind": "group"|"project", "user_id", "access_level"}]`.

And GitLab's OAuth 2.0 provider (`doc/api/oauth2.md`), from `"oauth": {"client_id",
"client_secret", "redirect_uri", "login_as": username, "deny": bool}`: `GET /oauth/authorize`
(the person is taken as signed in to GitLab as `login_as` and consenting, unless `deny`) checks
`client_id`, `redirect_uri`, `response_type=code` and a PKCE `code_challenge` with
`code_challenge_method=S256`, and redirects back with a one-time `code` and the `state`, or with
`error=access_denied`; `POST /oauth/token` (`grant_type=authorization_code`, the client's
credentials in HTTP Basic or the form) checks the code (once, 10 minutes), the `redirect_uri`
and that `code_verifier` hashes to the challenge, and answers `{"access_token": <the user's
token>, "token_type": "Bearer", "expires_in": 7200, ...}` or GitLab's `{"error": "invalid_grant"}`.
"""

from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import hashlib

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORLD, CALLS = sys.argv[1], sys.argv[2]
LOCK = threading.Lock()
PAGE_MAX = 100
CODES = {}  # code -> {"challenge", "redirect_uri", "user", "issued"}


def load():
    with open(WORLD) as f:
        return json.load(f)


def log(entry):
    with LOCK, open(CALLS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def cursor(n):
    return base64.b64encode(json.dumps({"id": str(n)}).encode()).decode()


def offset(after):
    if not after:
        return 0
    return int(json.loads(base64.b64decode(after))["id"])


def spp_node(world, path):
    if not path:
        return None
    for p in world["projects"]:
        if p["path"] == path:
            # GitLab answers `repository: null` to a token that may not download the code.
            repo = None if p.get("no_access") else {"rootRef": p.get("default_branch", "main")}
            return {"id": "gid://gitlab/Project/%d" % p["id"], "name": p.get("name", path.rsplit("/", 1)[-1]),
                    "fullPath": path, "httpUrlToRepo": p.get("http_url_to_repo"), "repository": repo}
    return None


def node(world, kind, n):
    return {"id": "gid://gitlab/%s/%d" % (kind, n["id"]), "fullPath": n["path"],
            "securityPolicyProject": spp_node(world, n.get("spp"))}


def connection(world, kind, items, first, after):
    start = offset(after)
    page = items[start:start + min(first or PAGE_MAX, PAGE_MAX)]
    end = start + len(page)
    return {"nodes": [node(world, kind, n) for n in page],
            "pageInfo": {"hasNextPage": end < len(items), "endCursor": cursor(end) if page else None}}


def under(path, root):
    return path.startswith(root + "/")


def answer(world, query, variables):
    after = variables.get("after")
    if "descendantGroups" in query:
        root = variables["path"]
        group = next((g for g in world["groups"] if g["path"] == root), None)
        if group is None:
            return "group_tree", {"data": {"group": None}}
        subgroups = sorted((g for g in world["groups"] if under(g["path"], root)), key=lambda g: g["path"])
        out = node(world, "Group", group)
        out["descendantGroups"] = connection(world, "Group", subgroups, 100, after)
        return "group_tree", {"data": {"group": out}}
    if "projects(includeSubgroups" in query:
        root = variables["path"]
        group = next((g for g in world["groups"] if g["path"] == root), None)
        if group is None:
            return "group_projects", {"data": {"group": None}}
        projects = sorted((p for p in world["projects"] if under(p["path"], root)), key=lambda p: p["path"])
        return "group_projects", {"data": {"group": {"projects": connection(world, "Project", projects, 100, after)}}}
    if query.lstrip().startswith("query($after: String) { groups"):
        groups = sorted(world["groups"], key=lambda g: g["path"])
        return "instance_groups", {"data": {"groups": connection(world, "Group", groups, 100, after)}}
    if query.lstrip().startswith("query($after: String) { projects"):
        projects = sorted(world["projects"], key=lambda p: p["path"])
        return "instance_projects", {"data": {"projects": connection(world, "Project", projects, 100, after)}}
    return "unknown", {"errors": [{"message": "Field 'nope' doesn't exist on type 'Query'"}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def authorize(self, world):
        oauth = world.get("oauth") or {}
        q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        log({"path": "/oauth/authorize", "auth_ok": False, "query_kind": "authorize"})
        if q.get("client_id") != oauth.get("client_id") or q.get("redirect_uri") != oauth.get("redirect_uri"):
            # GitLab shows its own error page, never redirecting to an unregistered URI.
            return self.reply(400, {"error": "invalid_client"})
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return self.reply(400, {"error": "invalid_request"})
        back = {"state": q.get("state", "")}
        if oauth.get("deny"):
            back["error"] = "access_denied"
        else:
            user = next(u for u in world["users"] if u["username"] == oauth["login_as"])
            code = base64.urlsafe_b64encode(hashlib.sha256(str(time.time_ns()).encode()).digest()).decode().rstrip("=")
            with LOCK:
                CODES[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"],
                               "user": user, "issued": time.time(), "scope": q.get("scope", "")}
            back["code"] = code
        self.redirect(q["redirect_uri"] + "?" + urlencode(back))

    def token(self, world, raw):
        oauth = world.get("oauth") or {}
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        auth = self.headers.get("Authorization") or ""
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        client_ok = client_id == oauth.get("client_id") and secret == oauth.get("client_secret")
        log({"path": "/oauth/token", "auth_ok": client_ok, "query_kind": "token"})
        if not client_ok:
            return self.reply(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        with LOCK:
            grant = CODES.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if (form.get("grant_type") != "authorization_code" or grant is None or time.time() - grant["issued"] > 600
                or grant["redirect_uri"] != form.get("redirect_uri") or not verifier or grant["challenge"] != challenge):
            return self.reply(400, {"error": "invalid_grant", "error_description": "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client."})
        self.reply(200, {"access_token": grant["user"]["token"], "token_type": "Bearer", "expires_in": 7200,
                         "refresh_token": "r-" + grant["user"]["token"], "scope": grant["scope"],
                         "created_at": int(time.time())})

    def do_GET(self):
        world = load()
        mode = world.get("mode", "up")
        if mode != "up" and "stall" in mode:
            log({"path": self.path, "auth_ok": False, "query_kind": "stalled"})
            time.sleep(mode["stall"])
            return
        if mode != "up":
            log({"path": self.path, "auth_ok": False, "query_kind": "status %d" % mode["status"]})
            return self.reply(mode["status"], {"message": "%d scripted" % mode["status"]})
        if self.path.startswith("/oauth/authorize"):
            return self.authorize(world)
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else self.headers.get("PRIVATE-TOKEN")
        user = next((u for u in world.get("users", []) if u["token"] == token), None)
        log({"path": self.path, "auth_ok": user is not None, "query_kind": "rest"})
        if user is None:
            return self.reply(401, {"message": "401 Unauthorized"})
        if self.path == "/api/v4/user":
            body = {"id": user["id"], "username": user["username"], "name": user["username"].title(), "state": "active"}
            if user.get("is_admin"):
                body["is_admin"] = True
            return self.reply(200, body)
        parts = self.path.split("/")
        # /api/v4/{groups|projects}/{id}/members/all/{user_id}
        if len(parts) == 8 and parts[1:3] == ["api", "v4"] and parts[5:7] == ["members", "all"]:
            kind = "group" if parts[3] == "groups" else "project"
            namespace, user_id = unquote(parts[4]), int(parts[7])
            if not any(n["path"] == namespace for n in world.get(kind + "s_known", [])) and not any(
                    m["namespace"] == namespace and m["kind"] == kind for m in world.get("members", [])):
                return self.reply(404, {"message": "404 %s Not Found" % kind.title()})
            member = next((m for m in world.get("members", []) if m["namespace"] == namespace
                           and m["kind"] == kind and m["user_id"] == user_id), None)
            if member is None:
                return self.reply(404, {"message": "404 Not found"})
            return self.reply(200, {"id": user_id, "username": "u%d" % user_id, "state": "active",
                                    "access_level": member["access_level"]})
        return self.reply(404, {"message": "404 Not Found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        world = load()
        auth_ok = self.headers.get("Authorization") == "Bearer " + world["token"]
        mode = world.get("mode", "up")
        kind = "-"
        try:
            request = json.loads(raw)
        except ValueError:
            request = {}
        if mode != "up" and "stall" in mode:
            log({"path": self.path, "auth_ok": auth_ok, "query_kind": "stalled"})
            time.sleep(mode["stall"])
            return
        if mode != "up":
            log({"path": self.path, "auth_ok": auth_ok, "query_kind": "status %d" % mode["status"]})
            return self.reply(mode["status"], {"message": "%d scripted" % mode["status"]})
        if self.path == "/oauth/token":
            return self.token(world, raw)
        if self.path != "/api/graphql":
            log({"path": self.path, "auth_ok": auth_ok, "query_kind": kind})
            return self.reply(404, {"message": "404 Not Found"})
        if not auth_ok:
            log({"path": self.path, "auth_ok": False, "query_kind": kind})
            return self.reply(401, {"message": "401 Unauthorized"})
        kind, body = answer(world, request.get("query", ""), request.get("variables") or {})
        log({"path": self.path, "auth_ok": True, "query_kind": kind})
        self.reply(200, body)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
