#!/usr/bin/env python3
"""An EMULATOR of the parts of InterSystems IRIS that Carina uses. It is not IRIS.

IRIS cannot run on the test machine, so this server follows IRIS's documented request and
response JSON instead:

* ``POST /api/atelier/v1/{namespace}/action/query`` (the Atelier REST API's SQL endpoint):
  body ``{"query": "...", "parameters": [...]}``, HTTP Basic auth; answers
  ``{"status": {"errors": [], "summary": ""}, "console": [], "result": {"content": [rows]}}``.
  A failing statement answers HTTP 200 with ``status.errors[0].error`` = ``ERROR #5540:
  SQLCODE: ... Message: ...`` (the shape IRIS uses for SQL errors); bad credentials answer 401
  with an empty body, as IRIS's web gateway does.
* ``POST /csp/carina/predict``: the ``Carina.Risk.REST`` class of ``docker/iris/``
  (``{"model": ..., "features": [...]}`` → the same status/result shape).

Only one statement shape is understood, the IntegratedML scoring query Carina sends:
``SELECT PREDICT(M) AS label, PROBABILITY(M FOR 1) AS p FROM (SELECT ? AS c1, ? AS c2, ...)``.
Like ``TRAIN MODEL``, the emulator fits its own model at start-up on
``docker/iris/icu_training_rows.csv`` (a logistic regression by IRLS on standardised columns),
so its probabilities are its own, not the ONNX model's.

Test controls (not IRIS): ``POST /_emulator/mode {"mode": "ok|auth|sql|timeout|5xx"}`` makes
the next queries fail that way; ``GET /_emulator/state`` returns the number of scoring calls and
the last probability answered.

Usage: emulator.py [--port 0] [--user U] [--password P] [--namespace USER] [--model IcuDeathRisk]
Prints ``listening <port>`` on stdout once ready.
"""
import argparse
import base64
import csv
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["Age", "Ldh", "LymphocytesPct", "HsCrp"]
QUERY = re.compile(
    r"^\s*SELECT\s+PREDICT\((\w+)\)\s+AS\s+label\s*,\s*PROBABILITY\((\w+)\s+FOR\s+1\)\s+AS\s+p\s+"
    r"FROM\s+\(\s*SELECT\s+(.+?)\s*\)\s*$",
    re.IGNORECASE | re.DOTALL,
)


def train(path):
    rows = list(csv.DictReader(open(path)))
    x = np.array([[float(r[c]) for c in COLUMNS] for r in rows])
    y = np.array([float(r["OutcomeDeath"]) for r in rows])
    mu, sd = x.mean(0), x.std(0)
    z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    for _ in range(50):  # IRLS with a small ridge term
        p = 1 / (1 + np.exp(-z @ w))
        h = z.T @ (z * (p * (1 - p))[:, None]) + 1e-3 * np.eye(len(w))
        w -= np.linalg.solve(h, z.T @ (p - y) + 1e-3 * w)
    return lambda v: float(1 / (1 + np.exp(-(w[0] + ((np.array(v) - mu) / sd) @ w[1:]))))


class State:
    def __init__(self):
        self.mode = "ok"
        self.calls = 0
        self.last = None
        self.lock = threading.Lock()


def sql_error(code, message):
    text = f"ERROR #5540: SQLCODE: {code} Message: {message}"
    return {
        "status": {"errors": [{"error": text, "code": 5540, "domain": "%ObjectErrors", "id": "SQLCode",
                               "params": [str(code), message]}], "summary": text},
        "console": [],
        "result": {},
    }


def make_handler(args, state, predict):
    expected_auth = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, body=None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self):
            if self.path == "/_emulator/state":
                with state.lock:
                    return self.reply(200, {"calls": state.calls, "last": state.last, "mode": state.mode})
            self.reply(404, {"status": {"errors": [{"error": "not found"}], "summary": "not found"}})

        def do_POST(self):
            if self.path == "/_emulator/mode":
                with state.lock:
                    state.mode = self.body()["mode"]
                return self.reply(200, {"mode": state.mode})
            atelier = re.fullmatch(r"/api/atelier/v1/([^/]+)/action/query", self.path)
            if not atelier and self.path != "/csp/carina/predict":
                return self.reply(404, {"status": {"errors": [{"error": "not found"}], "summary": ""}})
            with state.lock:
                state.calls += 1
                mode = state.mode
            if mode == "auth" or self.headers.get("Authorization") != expected_auth:
                return self.reply(401)
            if mode == "timeout":
                time.sleep(5)
            if mode == "5xx":
                return self.reply(503, None)
            try:
                req = self.body()
            except json.JSONDecodeError:
                return self.reply(400, sql_error(-1, "request body is not JSON"))
            if atelier:
                if atelier.group(1) != args.namespace:
                    return self.reply(404, {"status": {"errors": [{"error": f"Namespace '{atelier.group(1)}' does not exist"}], "summary": ""}})
                m = QUERY.match(req.get("query", ""))
                if not m or m.group(1) != m.group(2):
                    return self.reply(200, sql_error(-1, "Invalid SQL statement"))
                model = m.group(1)
                cols = [c.strip() for c in m.group(3).split(",")]
                names = []
                for c in cols:
                    cm = re.fullmatch(r"\?\s+AS\s+(\w+)", c, re.IGNORECASE)
                    if not cm:
                        return self.reply(200, sql_error(-1, f"Invalid select item {c}"))
                    names.append(cm.group(1))
                params = req.get("parameters", [])
            else:
                model, names, params = req.get("model"), COLUMNS, req.get("features", [])
            if mode == "sql" or model != args.model:
                return self.reply(200, sql_error(-400, f"Model '{model}' not found"))
            if sorted(names) != sorted(COLUMNS):
                return self.reply(200, sql_error(-29, f"Field(s) not found: {set(COLUMNS) ^ set(names)}"))
            if len(params) != len(names):
                return self.reply(200, sql_error(-1, "wrong number of parameters"))
            values = dict(zip(names, [float(v) for v in params]))
            p = predict([values[c] for c in COLUMNS])
            with state.lock:
                state.last = p
            return self.reply(200, {"status": {"errors": [], "summary": ""}, "console": [],
                                    "result": {"content": [{"label": "1" if p >= 0.5 else "0", "p": p}]}})

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--user", default="_SYSTEM")
    ap.add_argument("--password", default="SYS")
    ap.add_argument("--namespace", default="USER")
    ap.add_argument("--model", default="IcuDeathRisk")
    args = ap.parse_args()
    predict = train(ROOT / "docker/iris/icu_training_rows.csv")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args, State(), predict))
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
