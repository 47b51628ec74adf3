#!/usr/bin/env python3
"""FHIR throughput helper for bench/fhir.sh (issue 14 part 2): Synthea transaction bundles/s and
search latency on a large store. Standard library only.

  fhir.py gen    --src DIR --copies K --out DIR      K copies of each Synthea bundle, fresh UUIDs
  fhir.py load   --base URL --files DIR --clients C --pid PID --out JSONL [--limit N]
  fhir.py search --base URL --patients FILE --reps R --pid PID --out JSONL
  fhir.py table  --out JSONL --run-id ID

Each copy of a bundle has every UUID in it replaced by a fresh one (urn:uuid fullUrls, the
references to them, identifiers), so each copy is a new patient with its own history.
"""

import argparse
import glob
import http.client
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import urllib.parse
import uuid

UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def gen(a):
    srcs = sorted(glob.glob(os.path.join(a.src, "synthea_*.json")))
    if not srcs:
        sys.exit(f"fhir.py gen: no synthea_*.json in {a.src}")
    os.makedirs(a.out, exist_ok=True)
    texts = [open(s, "rb").read() for s in srcs]
    resources = 0
    for k in range(a.copies):
        for i, t in enumerate(texts):
            mapping = {}

            def fresh(m):
                old = m.group(0)
                if old not in mapping:
                    mapping[old] = str(uuid.uuid4()).encode()
                return mapping[old]

            body = UUID.sub(fresh, t)
            resources += len(json.loads(body)["entry"])
            with open(os.path.join(a.out, f"b{k:05d}-{i}.json"), "wb") as f:
                f.write(body)
    print(json.dumps({"bundles": a.copies * len(texts), "resources": resources}))


def conn_for(base):
    u = urllib.parse.urlsplit(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=300), u.path.rstrip("/")


def proc_stats(pid):
    """(CPU seconds, VmRSS MiB, VmHWM MiB) of a process, or Nones."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = hwm = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return cpu, rss, hwm
    except OSError:
        return None, None, None


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def load(a):
    files = sorted(glob.glob(os.path.join(a.files, "b*.json")))
    if a.skip:
        files = files[a.skip :]
    if a.limit:
        files = files[: a.limit]
    lock = threading.Lock()
    todo = list(enumerate(files))
    lat, done_at, errors, patients = [], [], [], []
    stats = {"resources": 0, "bytes": 0, "retries_503": 0}

    def worker():
        conn, path = conn_for(a.base)
        while True:
            with lock:
                if not todo:
                    break
                _, f = todo.pop(0)
            body = open(f, "rb").read()
            while True:
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path or "/", body, {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn, path = conn_for(a.base)
                    with lock:
                        errors.append(f"{os.path.basename(f)}: {e}")
                    break
                dt = time.perf_counter() - t0
                if r.status == 503:
                    with lock:
                        stats["retries_503"] += 1
                    time.sleep(float(r.getheader("Retry-After") or 1))
                    continue
                with lock:
                    if r.status != 200:
                        errors.append(f"{os.path.basename(f)}: HTTP {r.status} {data[:300]!r}")
                    else:
                        out = json.loads(data)
                        entries = out.get("entry", [])
                        stats["resources"] += len(entries)
                        stats["bytes"] += len(body)
                        for e in entries:
                            loc = e.get("response", {}).get("location", "")
                            if loc.startswith("Patient/"):
                                patients.append(loc.split("/")[1])
                        lat.append(dt)
                        done_at.append((time.perf_counter(), len(entries)))
                break
        conn.close()

    cpu0, _, _ = proc_stats(a.pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    cpu1, rss, hwm = proc_stats(a.pid)
    # resources/s in the first and the last fifth of the load (how cost grows with the store)
    done_at.sort()
    fifth = max(1, len(done_at) // 5)

    def rate(part):
        if len(part) < 2:
            return None
        return round(sum(n for _, n in part[1:]) / (part[-1][0] - part[0][0]), 1)

    line = {
        "run_id": a.run_id,
        "tag": a.tag,
        "kind": "load",
        "db": a.db,
        "clients": a.clients,
        "bundles": len(lat),
        "resources": stats["resources"],
        "store_before": a.store_before,
        "seconds": round(secs, 2),
        "bundles_per_s": round(len(lat) / secs, 2),
        "resources_per_s": round(stats["resources"] / secs, 1),
        "mb_per_s": round(stats["bytes"] / 1e6 / secs, 2),
        "res_per_s_first_fifth": rate(done_at[:fifth]),
        "res_per_s_last_fifth": rate(done_at[-fifth:]),
        "p50_ms": round(pct(lat, 50) * 1000, 1) if lat else None,
        "p99_ms": round(pct(lat, 99) * 1000, 1) if lat else None,
        "retries_503": stats["retries_503"],
        "errors": len(errors),
        "server_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
        "rss_mib": round(rss) if rss else None,
        "peak_rss_mib": round(hwm) if hwm else None,
        "loadavg": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": a.env,
    }
    for e in errors[:5]:
        print("  error:", e, file=sys.stderr)
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    if a.patients:
        with open(a.patients, "a") as f:
            f.writelines(p + "\n" for p in patients)
    print(json.dumps(line))
    if errors and not a.allow_errors:
        sys.exit(1)


# (name, query template): {p} is a random loaded patient's id
QUERIES = [
    ("read Patient/{p}", "Patient/{p}"),
    ("Patient?_id", "Patient?_id={p}"),
    ("Patient?identifier (Synthea id)", "Patient?identifier=https://github.com/synthetichealth/synthea|{p}"),
    ("Observation?patient", "Observation?patient=Patient/{p}"),
    ("Observation?patient&code (height)", "Observation?patient=Patient/{p}&code=http://loinc.org|8302-2"),
    ("Observation?patient&date=ge2015", "Observation?patient=Patient/{p}&date=ge2015-01-01"),
    ("DiagnosticReport?patient", "DiagnosticReport?patient=Patient/{p}"),
    ("Observation?code (height), _count=20", "Observation?code=http://loinc.org|8302-2&_count=20"),
    ("Observation?code=rare (none)", "Observation?code=http://loinc.org|00000-0"),
    ("Observation?date=ge2020-01-01, _count=20", "Observation?date=ge2020-01-01&_count=20"),
    ("Observation?date=ge2020-01-01, _count=20, _total=none", "Observation?date=ge2020-01-01&_count=20&_total=none"),
    ("Observation, _count=20 (newest first)", "Observation?_count=20"),
    ("Observation, _count=20, _total=none", "Observation?_count=20&_total=none"),
    ("Observation?_lastUpdated=gt(1 h ago)", "Observation?_lastUpdated=gt{hour_ago}&_count=20"),
    ("Patient?birthdate=lt1950", "Patient?birthdate=lt1950-01-01&_count=20"),
]


def store_total(conn, path):
    """Current resources of every type the CapabilityStatement names (type?_count=0 totals)."""
    conn.request("GET", f"{path}/metadata", headers={"Accept": "application/fhir+json"})
    cap = json.loads(conn.getresponse().read())
    total = {}
    for r in cap["rest"][0]["resource"]:
        conn.request("GET", f"{path}/{r['type']}?_count=0", headers={"Accept": "application/fhir+json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status == 200 and body.get("total"):
            total[r["type"]] = body["total"]
    return total


def search(a):
    patients = [p.strip() for p in open(a.patients) if p.strip()]
    # Synthea Patient identifiers: the bundle's own UUID; look one up per patient lazily
    conn, path = conn_for(a.base)
    rng = random.Random(1)
    hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    idents = {}
    rows = []
    by_type = store_total(conn, path)
    print(f"  store: {sum(by_type.values())} current resources {by_type}", file=sys.stderr)
    cpu0, _, _ = proc_stats(a.pid)
    for name, tmpl in QUERIES:
        lat, totals = [], []
        for _ in range(a.reps):
            p = rng.choice(patients)
            if "identifier" in tmpl:
                if p not in idents:
                    conn.request("GET", f"{path}/Patient/{p}", headers={"Accept": "application/fhir+json"})
                    r = conn.getresponse()
                    pat = json.loads(r.read())
                    ids = [i["value"] for i in pat.get("identifier", []) if i.get("system") == "https://github.com/synthetichealth/synthea"]
                    idents[p] = ids[0] if ids else p
                q = tmpl.format(p=idents[p], hour_ago=hour_ago)
            else:
                q = tmpl.format(p=p, hour_ago=hour_ago)
            url = f"{path}/{urllib.parse.quote(q, safe='/?=&:|')}"
            t0 = time.perf_counter()
            conn.request("GET", url, headers={"Accept": "application/fhir+json"})
            r = conn.getresponse()
            data = r.read()
            dt = time.perf_counter() - t0
            if r.status != 200:
                sys.exit(f"fhir.py search: {q}: HTTP {r.status} {data[:300]!r}")
            body = json.loads(data)
            lat.append(dt * 1000)
            if body.get("resourceType") == "Bundle":
                totals.append(body.get("total", f"{len(body.get('entry', []))} (no total)"))
            else:
                totals.append(1)
        rows.append(
            {
                "query": name,
                "example": tmpl,
                "reps": a.reps,
                "p50_ms": round(statistics.median(lat), 2),
                "p95_ms": round(pct(lat, 95), 2),
                "max_ms": round(max(lat), 2),
                "matches_median": statistics.median(totals)
                if all(isinstance(t, int) for t in totals)
                else totals[0],
            }
        )
        print(f"  {name:45s} p50 {rows[-1]['p50_ms']:8.2f} ms  p95 {rows[-1]['p95_ms']:8.2f}  matches {rows[-1]['matches_median']}", file=sys.stderr)
    cpu1, rss, hwm = proc_stats(a.pid)
    line = {
        "run_id": a.run_id,
        "tag": a.tag,
        "kind": "search",
        "db": a.db,
        "store_resources": sum(by_type.values()),
        "store_by_type": by_type,
        "queries": rows,
        "server_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
        "rss_mib": round(rss) if rss else None,
        "peak_rss_mib": round(hwm) if hwm else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": a.env,
    }
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")


def table(a):
    lines = [json.loads(l) for l in open(a.out) if l.strip()]
    lines = [l for l in lines if l.get("run_id") == a.run_id]
    print("| db | clients | store before | bundles | resources | bundles/s | resources/s (first / last fifth) | MB/s | p50 / p99 ms | 503 retries | server CPU s | RSS / peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for l in lines:
        if l["kind"] == "load":
            print(
                f"| {l['db']} | {l['clients']} | {l['store_before']} | {l['bundles']} | {l['resources']} | {l['bundles_per_s']} | "
                f"{l['resources_per_s']} ({l['res_per_s_first_fifth']} / {l['res_per_s_last_fifth']}) | {l['mb_per_s']} | "
                f"{l['p50_ms']} / {l['p99_ms']} | {l['retries_503']} | {l['server_cpu_s']} | {l['rss_mib']} / {l['peak_rss_mib']} |"
            )
    searches = [l for l in lines if l["kind"] == "search"]
    if searches:
        print()
        head = " | ".join(f"{l['db']} ({l['store_resources']} resources) p50 / p95 ms" for l in searches)
        print(f"| query | matches | {head} |")
        print("|---|---|" + "---|" * len(searches))
        for i, row in enumerate(searches[0]["queries"]):
            cells = " | ".join(f"{l['queries'][i]['p50_ms']} / {l['queries'][i]['p95_ms']}" for l in searches)
            print(f"| `{row['example']}` | {row['matches_median']} | {cells} |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--src", required=True)
    g.add_argument("--copies", type=int, required=True)
    g.add_argument("--out", required=True)
    for name in ("load", "search"):
        s = sub.add_parser(name)
        s.add_argument("--base", required=True)
        s.add_argument("--pid", type=int, required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--run-id", default="")
        s.add_argument("--tag", default="")
        s.add_argument("--db", default="sqlite")
        s.add_argument("--env", default="")
    l = sub.choices["load"]
    l.add_argument("--files", required=True)
    l.add_argument("--clients", type=int, default=4)
    l.add_argument("--limit", type=int, default=0)
    l.add_argument("--skip", type=int, default=0)
    l.add_argument("--patients", default="")
    l.add_argument("--store-before", type=int, default=0)
    l.add_argument("--allow-errors", action="store_true")
    s = sub.choices["search"]
    s.add_argument("--patients", required=True)
    s.add_argument("--reps", type=int, default=30)
    s.add_argument("--store-resources", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("--out", required=True)
    t.add_argument("--run-id", required=True)
    a = ap.parse_args()
    {"gen": gen, "load": load, "search": search, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
