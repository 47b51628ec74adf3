#!/usr/bin/env python3
"""Helper of bench/ingest.sh (DICOM ingest throughput, Carina vs Orthanc); run that script, not
this one. Needs pydicom and dicomweb-client (the repo's .venv has both) and dcmtk `storescu`.

Subcommands (each prints one JSON object on stdout unless said otherwise):
  gen --src FILE --out DIR --n N [--per-study 30]
      N copies of FILE with fresh Study/Series/SOP Instance UIDs (one series per study,
      --per-study instances each, PatientID BENCH-<run>-<study>) -> {"n", "bytes", "dir"}
  fsync --dir DIR [--seconds 3] [--writers 1 4] [--size BYTES]
      the disk's durable-write rate on DIR's filesystem: each writer loops "write BYTES to a
      temp file, fsync it, rename it, fsync the folder" (what a durable blob put costs) for
      --seconds -> {"mode": "fsync", "writers": {"1": ops_per_s, ...}, ...}
  freeport                        a free loopback TCP port (plain text)
  orthanc-start --dir DIR [--template bench/orthanc-ingest.json] [--aet ORTHANC]
      writes DIR/orthanc.json from the template (ports picked here), starts Orthanc detached
      (log DIR/orthanc.log, pid DIR/orthanc.pid, so `tests/orthanc/orthanc.py stop --dir DIR`
      stops it), waits for /system and the DICOM port -> {"pid", "http", "dicom_port", ...}
  run --server carina|orthanc --mode stow|cstore --clients K --analysis on|off|none
      --files DIR --http URL --dicom-port P --aec AE --pid PID --out JSONL [--batch 1] ...
      one measurement: K STOW-RS clients (processes; --client dicomweb-client, or raw:
      prebuilt multipart bodies over http.client; --batch instances per request) or K storescu associations, each sending a contiguous share of the files;
      checks how many were stored; with --analysis on (Carina) also waits until every analysis
      job is done or dead. Appends the result line to JSONL and prints it.
  table --out JSONL --run-id ID   Markdown table of one run's lines (plain text)
"""
import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def die(msg):
    print(f"ingest.py: {msg}", file=sys.stderr)
    sys.exit(1)


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


# ---------------------------------------------------------------------------------------- gen

def cmd_gen(a):
    import pydicom
    from pydicom.uid import generate_uid

    os.makedirs(a.out, exist_ok=True)
    src = pydicom.dcmread(a.src)
    tag = os.urandom(3).hex()
    total = 0
    study = series = None
    for i in range(a.n):
        k, j = divmod(i, a.per_study)
        if j == 0:
            study, series = generate_uid(), generate_uid()
        ds = src.copy()
        ds.file_meta = src.file_meta.copy()
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientID = f"BENCH-{tag}-{k:03d}"
        ds.StudyID, ds.AccessionNumber = str(k + 1), f"B{tag}{k:03d}"
        ds.SeriesNumber, ds.InstanceNumber = 1, j + 1
        path = os.path.join(a.out, f"{i:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        total += os.path.getsize(path)
    print(json.dumps({"n": a.n, "bytes": total, "dir": os.path.abspath(a.out)}))


# -------------------------------------------------------------------------------------- fsync

def fsync_writer(folder, size, seconds, start, counts, idx):
    payload = os.urandom(size)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    n = 0
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tmp = os.path.join(folder, f".w{idx}-{n}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(folder, f"w{idx}-{n}.dat"))
        os.fsync(dfd)
        n += 1
    os.close(dfd)
    counts[idx] = n


def cmd_fsync(a):
    out = {"mode": "fsync", "dir": os.path.abspath(a.dir), "bytes_per_write": a.size,
           "seconds": a.seconds, "writers": {}}
    try:
        st = os.statvfs(a.dir)
        out["fs_free_gb"] = round(st.f_bavail * st.f_frsize / 1e9, 1)
        dev = subprocess.run(["df", "--output=source,fstype", a.dir], capture_output=True,
                             text=True).stdout.split("\n")[1].split()
        out["device"], out["fstype"] = dev[0], dev[1]
    except (OSError, IndexError):
        pass
    for w in a.writers:
        folder = os.path.join(a.dir, f"fsync-{w}")
        os.makedirs(folder, exist_ok=True)
        start, counts = threading.Event(), [0] * w
        threads = [threading.Thread(target=fsync_writer,
                                    args=(folder, a.size, a.seconds, start, counts, i))
                   for i in range(w)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        start.set()
        for t in threads:
            t.join()
        out["writers"][str(w)] = round(sum(counts) / (time.monotonic() - t0), 1)
        shutil.rmtree(folder)
    print(json.dumps(out))


# ------------------------------------------------------------------------------------ orthanc

def cmd_freeport(_a):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def load_orthanc_py():
    spec = importlib.util.spec_from_file_location(
        "orthanc_test_helper", os.path.join(REPO, "tests", "orthanc", "orthanc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_orthanc_start(a):
    helper = load_orthanc_py()  # its plugin lookup and port picking, not its config
    d = os.path.abspath(a.dir)
    os.makedirs(d, exist_ok=True)
    cfg_path = os.path.join(d, "orthanc.json")
    with open(a.template) as f:
        cfg = json.load(f)
    name = f"carina-bench-{os.urandom(4).hex()}"
    http_port, dicom_port = helper.free_port(), helper.free_port()
    cfg.update({
        "Name": name,
        "StorageDirectory": os.path.join(d, "storage"),
        "IndexDirectory": os.path.join(d, "storage"),
        "Plugins": [helper.find_dicomweb_plugin()],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": a.aet,
    })
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    log = open(os.path.join(d, "orthanc.log"), "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([exe, cfg_path], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            cwd=d, start_new_session=True)
    with open(os.path.join(d, "orthanc.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
    base = f"http://127.0.0.1:{http_port}"
    version = None
    while time.monotonic() < t0 + 30:
        if proc.poll() is not None:
            die(f"Orthanc exited with status {proc.returncode}; see {d}/orthanc.log")
        try:
            system = json.loads(get(base + "/system", 2))
            if system.get("Name") != name:
                raise OSError("another server answers on the HTTP port")
            version = system.get("Version")
            with socket.create_connection(("127.0.0.1", dicom_port), timeout=2):
                pass
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    else:
        proc.kill()
        die(f"Orthanc did not start within 30 s; see {d}/orthanc.log")
    print(json.dumps({"pid": proc.pid, "http": base, "dicom_port": dicom_port, "aet": a.aet,
                      "dicom_web": base + "/dicom-web", "dir": d, "version": version,
                      "startup_s": round(time.monotonic() - t0, 3)}))


# ---------------------------------------------------------------------------------------- run

def shares(files, k):
    """k contiguous, near-equal shares of files (empty ones dropped)."""
    q, r = divmod(len(files), k)
    out, i = [], 0
    for c in range(k):
        n = q + (1 if c < r else 0)
        out.append(files[i:i + n])
        i += n
    return [s for s in out if s]


def stow_client(base, paths, batch, barrier, results):
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(p) for p in paths]  # read before the clock starts
    client = DICOMwebClient(url=base)
    ok = failed = 0
    errors = []
    barrier.wait()
    for i in range(0, len(datasets), batch):
        chunk = datasets[i:i + batch]
        try:
            resp = client.store_instances(chunk)
            bad = len(resp.get("FailedSOPSequence", []) or [])
            ok += len(chunk) - bad
            failed += bad
        except Exception as e:  # an HTTP error fails the whole request
            failed += len(chunk)
            if len(errors) < 3:
                errors.append(str(e)[:300])
    results.put({"end": time.monotonic(), "ok": ok, "failed": failed, "errors": errors})


def stow_raw(base, paths, batch, barrier, results):
    """A cheap STOW-RS client: multipart bodies built from the files' bytes before the clock
    starts, posted over one keep-alive connection (http.client), the response's DICOM JSON
    read for failed instances. It spends far less CPU per request than dicomweb-client (which
    re-encodes each dataset with pydicom), so the server, not the client, is measured."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(base)
    boundary = "carina-bench-%d" % os.getpid()
    bodies = []
    for i in range(0, len(paths), batch):
        parts = []
        for p in paths[i:i + batch]:
            with open(p, "rb") as f:
                parts.append(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n"
                             % (boundary.encode(), f.read()))
        bodies.append((len(parts), b"".join(parts) + b"--%s--\r\n" % boundary.encode()))
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=%s'
               % boundary, "Accept": "application/dicom+json"}
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    ok = failed = 0
    errors = []
    barrier.wait()
    for n, body in bodies:
        try:
            conn.request("POST", u.path + "/studies", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status not in (200, 202):
                raise RuntimeError("HTTP %d: %s" % (resp.status, data[:200]))
            doc = json.loads(data or b"{}")
            bad = len((doc.get("00081198") or {}).get("Value") or [])
            ok += n - bad
            failed += bad
        except Exception as e:
            failed += n
            if len(errors) < 3:
                errors.append(str(e)[:300])
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    results.put({"end": time.monotonic(), "ok": ok, "failed": failed, "errors": errors})


def run_stow(a, files):
    ctx = mp.get_context("fork")
    parts = shares(files, a.clients)
    barrier, results = ctx.Barrier(len(parts) + 1), ctx.Queue()
    target = stow_raw if a.client == "raw" else stow_client
    procs = [ctx.Process(target=target, args=(a.dicomweb, p, a.batch, barrier, results))
             for p in parts]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    t0 = time.monotonic()
    got = [results.get(timeout=a.timeout) for _ in procs]
    for p in procs:
        p.join()
    errors = [e for g in got for e in g["errors"]][:3]
    return t0, max(g["end"] for g in got), sum(g["failed"] for g in got), errors


def run_cstore(a, files, logdir):
    parts = shares(files, a.clients)
    procs = []
    t0 = time.monotonic()
    for i, p in enumerate(parts):
        log = open(os.path.join(logdir, f"storescu-{a.server}-{a.clients}-{a.analysis}-{i}.log"),
                   "wb")
        procs.append(subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", a.aec, "127.0.0.1", str(a.dicom_port), *p],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
    ends, errors = [], []
    for i, p in enumerate(procs):
        rc = p.wait(timeout=a.timeout)
        ends.append(time.monotonic())
        if rc != 0:
            errors.append(f"storescu #{i} exit {rc} (see {logdir})")
    # storescu halts on the first failed store, so a failure is counted from the store below
    return t0, max(ends), None, errors


def stored_count(a):
    if a.server == "orthanc":
        return json.loads(get(a.http + "/statistics"))["CountInstances"]
    # Carina: QIDO over the DX instances (the Secondary Captures it makes are OT)
    n, off = 0, 0
    while True:
        page = json.loads(get(f"{a.dicomweb}/instances?Modality=DX&limit=1000&offset={off}")
                          or b"[]")
        n += len(page)
        if len(page) < 1000:
            return n
        off += 1000


METRIC = re.compile(r'^carina_jobs\{kind="([^"]+)",state="([^"]+)"\} (\d+)', re.M)


def carina_jobs(a):
    text = get(a.http + "/metrics").decode()
    jobs = {}
    for kind, state, n in METRIC.findall(text):
        jobs[(kind, state)] = jobs.get((kind, state), 0) + int(n)
    return jobs


def wait_analysed(a, expected, t0):
    """Seconds from t0 until every analyse job is finished (done or dead), and the counts."""
    deadline = time.monotonic() + a.timeout
    while True:
        j = carina_jobs(a)
        pending = sum(n for (k, s), n in j.items() if s in ("queued", "running"))
        done, dead = j.get(("analyse", "done"), 0), j.get(("analyse", "dead"), 0)
        if pending == 0 and done + dead >= expected:
            return time.monotonic() - t0, done, dead
        if time.monotonic() > deadline:
            die(f"analyses not finished after {a.timeout} s: {j}")
        time.sleep(0.1)


def cpu_seconds(pid):
    """utime + stime of pid and its reaped children, seconds (None when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cmd_run(a):
    files = sorted(os.path.join(a.files, f) for f in os.listdir(a.files) if f.endswith(".dcm"))
    nbytes = sum(os.path.getsize(f) for f in files)
    load1 = os.getloadavg()[0]
    cpu0 = cpu_seconds(a.pid) if a.pid else None
    if a.mode == "stow":
        t0, t1, failed, errors = run_stow(a, files)
    else:
        t0, t1, failed, errors = run_cstore(a, files, a.logdir)
    secs = t1 - t0
    stored = stored_count(a) - a.stored_before
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": a.run_id, "server": a.server,
        "version": a.version, "mode": a.mode, "clients": a.clients,
        "client": (("dicomweb-client %s" % dicomweb_version() if a.client == "dicomweb-client"
                    else "raw (http.client keep-alive, prebuilt multipart)")
                   + ", %d instance(s)/request, 1 process per client" % a.batch)
        if a.mode == "stow"
        else "dcmtk storescu, 1 association per process",
        "analysis": None if a.analysis == "none" else a.analysis,
        "n": len(files), "stored": stored, "stored_before": a.stored_before, "failed": (len(files) - stored) if failed is None
        else failed, "bytes": nbytes,
        "seconds": round(secs, 3), "inst_per_s": round(len(files) / secs, 1),
        "mb_per_s": round(nbytes / 1e6 / secs, 1),
    }
    if a.analysis == "on":
        done_s, done, dead = wait_analysed(a, stored, t0)
        line.update({"analysed_seconds": round(done_s, 3),
                     "analysed_inst_per_s": round(len(files) / done_s, 1),
                     "analysed_done": done, "analysed_dead": dead})
    cpu1 = cpu_seconds(a.pid) if a.pid else None
    if cpu0 is not None and cpu1 is not None:
        line["server_cpu_s"] = round(cpu1 - cpu0, 2)
    line["loadavg_1m_before"] = round(load1, 2)
    line["cores"] = os.cpu_count()
    if a.env:
        line["env"] = a.env
    if errors:
        line["errors"] = errors
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


def dicomweb_version():
    try:
        from importlib.metadata import version
        return version("dicomweb-client")
    except Exception:
        return "?"


# -------------------------------------------------------------------------------------- table

def cmd_table(a):
    rows = [json.loads(x) for x in open(a.out) if x.strip()]
    rows = [r for r in rows if r.get("run_id") == a.run_id]
    print("| server | mode | clients | analysis | n | stored | s | inst/s | MB/s "
          "| all analysed s | inst/s analysed |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r.get("mode") == "fsync":
            continue
        what = {"stow": "STOW-RS", "cstore": "C-STORE"}[r["mode"]]
        print(f"| {r['server']} | {what} | {r['clients']} | {r['analysis'] or '—'} | {r['n']} "
              f"| {r['stored']} | {r['seconds']} | {r['inst_per_s']} | {r['mb_per_s']} "
              f"| {r.get('analysed_seconds', '—')} | {r.get('analysed_inst_per_s', '—')} |")


# --------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("gen")
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--per-study", type=int, default=30)
    s.set_defaults(fn=cmd_gen)
    s = sub.add_parser("fsync")
    s.add_argument("--dir", required=True)
    s.add_argument("--seconds", type=float, default=3)
    s.add_argument("--writers", type=int, nargs="+", default=[1])
    s.add_argument("--size", type=int, default=215608)
    s.set_defaults(fn=cmd_fsync)
    s = sub.add_parser("freeport")
    s.set_defaults(fn=cmd_freeport)
    s = sub.add_parser("orthanc-start")
    s.add_argument("--dir", required=True)
    s.add_argument("--template", default=os.path.join(HERE, "orthanc-ingest.json"))
    s.add_argument("--aet", default="ORTHANC")
    s.set_defaults(fn=cmd_orthanc_start)
    s = sub.add_parser("run")
    s.add_argument("--server", choices=["carina", "orthanc"], required=True)
    s.add_argument("--version", default=None)
    s.add_argument("--mode", choices=["stow", "cstore"], required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--analysis", choices=["on", "off", "none"], required=True)
    s.add_argument("--files", required=True)
    s.add_argument("--http", required=True)
    s.add_argument("--dicomweb", required=True)
    s.add_argument("--dicom-port", type=int, required=True)
    s.add_argument("--aec", required=True)
    s.add_argument("--pid", type=int, default=0)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--client", choices=["dicomweb-client", "raw"], default="dicomweb-client",
                   help="STOW-RS client: dicomweb-client, or raw (prebuilt bodies, http.client)")
    s.add_argument("--timeout", type=float, default=1800)
    s.add_argument("--logdir", default=".")
    s.add_argument("--out", required=True)
    s.add_argument("--run-id", required=True)
    s.add_argument("--env", default="")
    s.add_argument("--stored-before", type=int, default=0,
                   help="instances the server held before this run (PRELOAD)")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("table")
    s.add_argument("--out", required=True)
    s.add_argument("--run-id", required=True)
    s.set_defaults(fn=cmd_table)
    a = ap.parse_args()
    for k in ("http", "dicomweb"):
        if getattr(a, k, None):
            setattr(a, k, getattr(a, k).rstrip("/"))
    a.fn(a)


if __name__ == "__main__":
    main()
