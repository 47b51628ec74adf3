#!/usr/bin/env python3
"""A SMART Backend Services client (client_credentials + private_key_jwt) for Carina's auth tests.

  python tests/auth/backend_client.py --fhir BASE --client-id carina-backend --key client.json \
      --scope "system/Observation.rs system/Observation.c" [--token-endpoint URL] [--print-token]

Without --token-endpoint the token endpoint is discovered from BASE/.well-known/smart-configuration.
The client assertion is an RS384 JWT (header kid + typ JWT; iss = sub = client id, aud = token
endpoint, exp = now + 300, random jti), sent with grant_type=client_credentials.

--print-token prints the access token and exits. Otherwise the default scenario runs with the
bearer token: create an Observation, read it back, search by code, then print ONE JSON line
  {"token_ok":true,"create_status":201,"read_status":200,"search_status":200,"search_total":N,"id":"..."}
HTTP statuses are reported as received (non-2xx does not stop the scenario). If the token request
fails, the line is {"token_ok":false,"token_status":S,"token_error":...} and the exit status is 1.
HTTP is stdlib urllib; JOSE is PyJWT + cryptography.
"""
import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import jwt  # PyJWT

FHIR_JSON = "application/fhir+json"
CODE = "http://loinc.org|2532-0"


# No proxies: the tests talk to loopback servers, whatever http_proxy says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, body=None, headers=None, timeout=30):
    """Returns (status, headers, body bytes); non-2xx statuses are returned, not raised.
    A connection failure gives status None and the error text as the body."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except (urllib.error.URLError, OSError) as e:
        return None, None, f"{method} {url}: {e}".encode("utf-8")


def parse_json(raw):
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def load_key(path, kid=None):
    with open(path, encoding="utf-8") as f:
        keys = json.load(f)["keys"]
    jwk = next((k for k in keys if kid is None or k.get("kid") == kid), None)
    if jwk is None:
        sys.exit(f"backend_client: no key with kid {kid} in {path}")
    return jwk


def discover_token_endpoint(fhir_base):
    url = fhir_base.rstrip("/") + "/.well-known/smart-configuration"
    status, _, raw = http("GET", url, headers={"Accept": "application/json"})
    doc = parse_json(raw)
    if status != 200 or not isinstance(doc, dict) or "token_endpoint" not in doc:
        sys.exit(f"backend_client: GET {url} -> {status}, no token_endpoint: {raw[:300].decode('utf-8', 'replace')}")
    return doc["token_endpoint"]


def client_assertion(client_id, token_endpoint, jwk, alg):
    key = jwt.PyJWK(jwk, algorithm=alg)
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key.key, algorithm=alg, headers={"kid": jwk["kid"], "typ": "JWT"})


def get_token(token_endpoint, client_id, jwk, alg, scope):
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(client_id, token_endpoint, jwk, alg),
    }
    status, _, raw = http(
        "POST",
        token_endpoint,
        urllib.parse.urlencode(form).encode("ascii"),
        {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    return status, parse_json(raw), raw


def observation():
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "2532-0",
                        "display": "Lactate dehydrogenase [Enzymatic activity/volume] in Serum or Plasma"}],
        },
        "subject": {"reference": "Patient/example-1"},
        "valueQuantity": {"value": 250, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"},
    }


def id_from_location(location):
    # .../Observation/{id}[/_history/{vid}]
    parts = [p for p in urllib.parse.urlparse(location).path.split("/") if p]
    if "Observation" in parts:
        i = parts.index("Observation")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def scenario(base, token):
    auth = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
    out = {"token_ok": True}
    status, headers, raw = http(
        "POST", f"{base}/Observation", json.dumps(observation()).encode("utf-8"),
        {**auth, "Content-Type": FHIR_JSON},
    )
    out["create_status"] = status
    body = parse_json(raw)
    oid = None
    if headers is not None and headers.get("Location"):
        oid = id_from_location(headers["Location"])
    if oid is None and isinstance(body, dict) and body.get("resourceType") == "Observation":
        oid = body.get("id")
    if oid is not None:
        status, _, _ = http("GET", f"{base}/Observation/{urllib.parse.quote(oid, safe='')}", headers=auth)
        out["read_status"] = status
    else:
        out["read_status"] = None
    query = urllib.parse.urlencode({"code": CODE})
    status, _, raw = http("GET", f"{base}/Observation?{query}", headers=auth)
    out["search_status"] = status
    bundle = parse_json(raw)
    total = None
    if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle":
        total = bundle.get("total")
        if total is None:
            total = sum(1 for e in bundle.get("entry", [])
                        if e.get("search", {}).get("mode", "match") == "match")
    out["search_total"] = total
    out["id"] = oid
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fhir", required=True, help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--key", required=True, help="private JWK Set of the client (keys.mjs client.json)")
    ap.add_argument("--kid", help="key to use from --key (default: the first)")
    ap.add_argument("--alg", default=None, help="assertion alg (default: the key's alg, else RS384)")
    ap.add_argument("--scope", required=True)
    ap.add_argument("--token-endpoint", help="skip discovery via BASE/.well-known/smart-configuration")
    ap.add_argument("--print-token", action="store_true", help="print the access token and exit")
    a = ap.parse_args()

    base = a.fhir.rstrip("/")
    jwk = load_key(a.key, a.kid)
    alg = a.alg or jwk.get("alg") or "RS384"
    token_endpoint = a.token_endpoint or discover_token_endpoint(base)
    status, body, raw = get_token(token_endpoint, a.client_id, jwk, alg, a.scope)
    token = body.get("access_token") if isinstance(body, dict) else None
    if status != 200 or not token:
        print(json.dumps({"token_ok": False, "token_status": status,
                          "token_error": body if isinstance(body, dict) else raw[:500].decode("utf-8", "replace")}),
              flush=True)
        return 1
    if a.print_token:
        print(token, flush=True)
        return 0
    print(json.dumps(scenario(base, token)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
