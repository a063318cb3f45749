"""A stand-in for ``ray start --head --block``, for the embedded data centre's tests: run as
the ``ray`` command, it serves a Ray dashboard's Serve REST API (token auth on, as Ray 2.60)
on the ``--dashboard-port`` it is given and blocks, so that a control plane owns it as a
child process the way it owns a real Ray head, at none of the cost. Applications run as
soon as they are PUT. It writes its pid to ``head.pid`` in its ``--temp-dir``, for a test
to kill it. Only the standard library: it starts in a fraction of a second."""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import sys
from typing import Any


def running(app: dict[str, Any]) -> dict[str, Any]:
    replicas = int((app.get("deployments") or [{}])[0].get("num_replicas", 1))
    return {"status": "RUNNING", "source": "declarative", "route_prefix": app.get("route_prefix"), "deployed_app_config": app,
            "deployment_topology": {"ingress_deployment": "Ingress"},
            "deployments": {"Ingress": {"target_num_replicas": replicas, "replicas": [{"state": "RUNNING"}] * replicas}}}


def main(argv: list[str]) -> None:
    flags = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--") and not b.startswith("--")} if argv[:2] == ["start", "--head"] else {}
    if "--dashboard-port" not in flags or "--temp-dir" not in flags:
        sys.exit(f"not a `ray start --head` the stand-in knows: {argv}")
    token = pathlib.Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    temp_dir = pathlib.Path(flags["--temp-dir"])
    temp_dir.mkdir(parents=True, exist_ok=True)
    applications: dict[str, dict[str, Any]] = {}
    http_options: dict[str, Any] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.authorized():
                self.answer(200, {"applications": {name: running(app) for name, app in dict(applications).items()},
                                  "http_options": http_options})

        def do_PUT(self) -> None:
            if self.authorized():
                config = json.loads(self.rfile.read(int(self.headers["content-length"])))
                applications.clear()
                applications.update({a["name"]: a for a in config["applications"]})
                http_options.update(config.get("http_options") or {})
                self.answer(200, {})

        def authorized(self) -> bool:
            if self.path.rstrip("/") != "/api/serve/applications":
                self.answer(404, {})
                return False
            given = self.headers.get("authorization")
            if given != f"Bearer {token}":
                self.answer(401 if given is None else 403, {})
                return False
            return True

        def answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(flags["--dashboard-port"])), Handler)
    (temp_dir / "head.pid").write_text(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
