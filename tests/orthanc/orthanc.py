#!/usr/bin/env python3
"""Start/stop a throw-away Orthanc PACS on loopback ports, and talk to it (stdlib only).

Subcommands (each prints JSON on stdout; diagnostics go to stderr; exit 0 on success):
  start --dir DIR --http-port P --dicom-port Q [--aet ORTHANC]
        [--modality NAME=AET@HOST:PORT ...] [--dicomweb-server NAME=URL ...]
        [--timeout 30] [--orthanc /usr/sbin/Orthanc]
      Writes DIR/orthanc.json, starts `Orthanc DIR/orthanc.json` detached (log DIR/orthanc.log,
      pid DIR/orthanc.pid), waits until GET /system answers and the DICOM port accepts TCP,
      prints {"pid", "http", "dicom_port", "aet", "dicom_web", "dir", "startup_s"}.
      A port of 0 means "pick a free loopback port".
  stop --dir DIR [--timeout 10] [--kill]
                                     SIGTERM the recorded pid (SIGKILL after timeout; at once with
                                     --kill), wait until it is gone. Graceful stop takes 1.5-3.5 s.
  upload --http URL FILE...          POST /instances -> [{id, SOPInstanceUID, Status, file}]
  send --http URL --modality NAME [--timeout S] RESOURCE_ID...
                                     POST /modalities/NAME/store (Synchronous) -> Orthanc's answer
  instances --http URL               every stored instance -> [{id, SOPInstanceUID, SOPClassUID,
                                     StudyInstanceUID, SeriesInstanceUID, TransferSyntaxUID}]
  clear --http URL                   DELETE every patient (empties the PACS) -> {"deleted": n}
  wado-url --http URL                the DICOMweb base URL, e.g. http://127.0.0.1:P/dicom-web
"""
import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PLUGIN_CANDIDATES = [
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",  # Debian: symlink to /usr/lib/orthanc/...
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
]


def die(msg, code=1):
    print(f"orthanc.py: {msg}", file=sys.stderr)
    sys.exit(code)


def find_dicomweb_plugin():
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if env:
        return env
    for p in PLUGIN_CANDIDATES:
        if os.path.exists(p):
            return p
    hits = sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")) + sorted(
        glob.glob("/usr/**/libOrthancDicomWeb.so*", recursive=True))
    if hits:
        return hits[0]
    die("libOrthancDicomWeb.so not found (apt-get install orthanc-dicomweb, "
        "or set ORTHANC_DICOMWEB_PLUGIN)")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, ctype=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        die(f"{method} {url} -> HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}")
    except urllib.error.URLError as e:
        die(f"{method} {url} -> {e.reason}")
    return json.loads(data) if data else None


def parse_modality(spec):
    # NAME=AET@HOST:PORT
    try:
        name, rest = spec.split("=", 1)
        aet, hostport = rest.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return name, [aet, host, int(port)]
    except ValueError:
        die(f"bad --modality {spec!r}; expected NAME=AET@HOST:PORT", 2)


def parse_server(spec):
    try:
        name, url = spec.split("=", 1)
    except ValueError:
        die(f"bad --dicomweb-server {spec!r}; expected NAME=URL", 2)
    if not url.endswith("/"):
        url += "/"
    return name, [url]


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except FileNotFoundError:
        return False
    return True


def pid_is_ours(pid, cfg):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return cfg.encode() in f.read()
    except FileNotFoundError:
        return False


def cmd_start(a):
    d = os.path.abspath(a.dir)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "orthanc.json")
    pidfile = os.path.join(d, "orthanc.pid")
    if os.path.exists(pidfile):
        old = int(open(pidfile).read().strip() or 0)
        if old and pid_alive(old) and pid_is_ours(old, cfg):
            die(f"an Orthanc (pid {old}) already runs from {d}; stop it first")
    exe = a.orthanc or shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not os.path.exists(exe):
        die("Orthanc executable not found (apt-get install orthanc)")
    http_port = a.http_port or free_port()
    dicom_port = a.dicom_port or free_port()
    name = f"carina-test-{a.aet}-{os.urandom(4).hex()}"  # proves /system is *this* Orthanc
    config = {
        "Name": name,
        "StorageDirectory": os.path.join(d, "storage"),
        "IndexDirectory": os.path.join(d, "storage"),
        "StorageCompression": False,
        "Plugins": [find_dicomweb_plugin()],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,      # HTTP answers loopback clients only
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "HttpTimeout": 30,
        "HttpThreadsCount": 8,
        "DicomServerEnabled": True,
        "DicomAet": a.aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "UnknownSopClassAccepted": True,
        "DicomScuTimeout": 10,
        "DicomScpTimeout": 30,
        "DicomThreadsCount": 4,
        "DicomModalities": dict(parse_modality(m) for m in a.modality),
        "DicomModalitiesInDatabase": False,
        "StableAge": 1,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "OverwriteInstances": True,
        "DeidentifyLogs": False,
        "ExecuteLuaEnabled": False,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            "Servers": dict(parse_server(s) for s in a.dicomweb_server),
        },
    }
    with open(cfg, "w") as f:
        json.dump(config, f, indent=2)
    log = open(os.path.join(d, "orthanc.log"), "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([exe, cfg], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            cwd=d, start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    base = f"http://127.0.0.1:{http_port}"
    deadline = t0 + a.timeout
    ready = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            os.remove(pidfile)
            tail = open(os.path.join(d, "orthanc.log"), errors="replace").read()[-3000:]
            die(f"Orthanc exited with status {proc.returncode} during startup; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(base + "/system", timeout=2) as r:
                if json.loads(r.read()).get("Name") != name:
                    raise OSError("another server answers on the HTTP port")
            with socket.create_connection(("127.0.0.1", dicom_port), timeout=2):
                pass
            ready = True
            break
        except (OSError, ValueError):
            time.sleep(0.1)
    if not ready:
        proc.kill()
        proc.wait()
        os.remove(pidfile)
        die(f"Orthanc did not answer {base}/system within {a.timeout}s; see {d}/orthanc.log")
    print(json.dumps({
        "pid": proc.pid, "http": base, "dicom_port": dicom_port, "aet": a.aet,
        "dicom_web": base + "/dicom-web", "dir": d,
        "startup_s": round(time.monotonic() - t0, 3),
    }))


def cmd_stop(a):
    d = os.path.abspath(a.dir)
    pidfile = os.path.join(d, "orthanc.pid")
    cfg = os.path.join(d, "orthanc.json")
    try:
        pid = int(open(pidfile).read().strip())
    except (FileNotFoundError, ValueError):
        print(json.dumps({"stopped": False, "reason": "no pid file"}))
        return
    t0 = time.monotonic()
    killed = False
    if pid_alive(pid) and pid_is_ours(pid, cfg):
        os.kill(pid, signal.SIGKILL if a.kill else signal.SIGTERM)
        killed = a.kill
        deadline = t0 + a.timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            killed = True
            while pid_alive(pid):
                time.sleep(0.05)
        stopped = True
    else:
        stopped = False
    os.remove(pidfile)
    print(json.dumps({"stopped": stopped, "pid": pid, "sigkill": killed,
                      "stop_s": round(time.monotonic() - t0, 3)}))


def cmd_upload(a):
    out = []
    for path in a.files:
        with open(path, "rb") as f:
            r = http("POST", a.http + "/instances", f.read(), "application/dicom")
        tags = http("GET", f"{a.http}/instances/{r['ID']}")["MainDicomTags"]
        out.append({"id": r["ID"], "SOPInstanceUID": tags.get("SOPInstanceUID"),
                    "Status": r.get("Status"), "file": path})
    print(json.dumps(out))


def cmd_send(a):
    body = json.dumps({"Resources": a.resources, "Synchronous": True,
                       "Timeout": a.timeout}).encode()
    print(json.dumps(http("POST", f"{a.http}/modalities/{a.modality}/store", body,
                          "application/json", timeout=a.timeout + 30)))


def cmd_instances(a):
    out = []
    for inst in http("GET", a.http + "/instances?expand"):
        iid = inst["ID"]
        tags = http("GET", f"{a.http}/instances/{iid}/simplified-tags")
        meta = http("GET", f"{a.http}/instances/{iid}/metadata?expand")
        out.append({
            "id": iid,
            "SOPInstanceUID": tags.get("SOPInstanceUID"),
            "SOPClassUID": tags.get("SOPClassUID"),
            "StudyInstanceUID": tags.get("StudyInstanceUID"),
            "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
            "TransferSyntaxUID": meta.get("TransferSyntax"),
            "RemoteAET": meta.get("RemoteAET"),
            "Origin": meta.get("Origin"),
        })
    print(json.dumps(out))


def cmd_clear(a):
    n = 0
    for p in http("GET", a.http + "/patients"):
        http("DELETE", f"{a.http}/patients/{p}")
        n += 1
    print(json.dumps({"deleted": n}))


def cmd_wado_url(a):
    print(a.http.rstrip("/") + "/dicom-web")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True)
    s.add_argument("--http-port", type=int, default=0)
    s.add_argument("--dicom-port", type=int, default=0)
    s.add_argument("--aet", default="ORTHANC")
    s.add_argument("--modality", action="append", default=[], metavar="NAME=AET@HOST:PORT")
    s.add_argument("--dicomweb-server", action="append", default=[], metavar="NAME=URL")
    s.add_argument("--timeout", type=float, default=30)
    s.add_argument("--orthanc", help="path of the Orthanc executable")
    s.set_defaults(fn=cmd_start)
    s = sub.add_parser("stop")
    s.add_argument("--dir", required=True)
    s.add_argument("--timeout", type=float, default=10)
    s.add_argument("--kill", action="store_true", help="SIGKILL at once (no graceful shutdown)")
    s.set_defaults(fn=cmd_stop)
    s = sub.add_parser("upload")
    s.add_argument("--http", required=True)
    s.add_argument("files", nargs="+")
    s.set_defaults(fn=cmd_upload)
    s = sub.add_parser("send")
    s.add_argument("--http", required=True)
    s.add_argument("--modality", required=True)
    s.add_argument("--timeout", type=int, default=60)
    s.add_argument("resources", nargs="+")
    s.set_defaults(fn=cmd_send)
    s = sub.add_parser("instances")
    s.add_argument("--http", required=True)
    s.set_defaults(fn=cmd_instances)
    s = sub.add_parser("clear")
    s.add_argument("--http", required=True)
    s.set_defaults(fn=cmd_clear)
    s = sub.add_parser("wado-url")
    s.add_argument("--http", required=True)
    s.set_defaults(fn=cmd_wado_url)
    a = ap.parse_args()
    if getattr(a, "http", None):
        a.http = a.http.rstrip("/")
    a.fn(a)


if __name__ == "__main__":
    main()
