#!/usr/bin/env python3
"""End-to-end DICOMweb (PS3.18) check of a running Carina with dicomweb-client.

  dicomweb_check.py --url http://127.0.0.1:8080 --files a.dcm b.dcm ...
                    [--no-rendered] [--timeout 60] [--verbose]

The DICOMweb base is URL + "/dicomweb" (override with --base).  Steps:

  stow                  STOW-RS store_instances(all files, one request);
                        response has a ReferencedSOPSequence entry for every
                        SOP Instance UID (and no FailedSOPSequence entry)
  qido_studies_patient  search_for_studies(PatientID=...) finds each study of
                        that patient (files without PatientID are skipped)
  qido_studies_date     search_for_studies(StudyDate="min-max" of the files'
                        StudyDate) finds each study having a StudyDate
  qido_series           search_for_series(study) lists each stored series
  qido_series_all       search_for_series(SeriesInstanceUID=...)  (/series)
  qido_instances        search_for_instances(study, series) lists each SOP
  qido_instances_all    search_for_instances(SOPInstanceUID=...)  (/instances)
  wado_instance         retrieve_instance (application/dicom, transfer-syntax=*):
                        same SOPInstanceUID, PixelData bytes equal the file's
  wado_instance_metadata retrieve_instance_metadata: SOPInstanceUID matches
  wado_series_metadata  retrieve_series_metadata: has every stored SOP of it
  wado_study            retrieve_study: returned instances include every
                        stored SOP of that study (count reported)
  wado_rendered         retrieve_instance_rendered(image/png): PNG signature
                        (skipped with --no-rendered)

Prints one JSON object on stdout:
  {"ok": bool, "base": url, "files": n, "passed": n, "failed": n,
   "warnings": [...], "checks": [{"check": name, "ok": bool, "target": uid|null,
                                   "detail": str|null}, ...]}
Exit status: 0 all checks passed, 1 some check failed, 2 usage / unreadable
input / server unreachable (STOW could not even be sent).

Notes: several files in dicom-samples share UIDs (all MR_small_* have the
same SOP Instance UID, SC_rgb and SC_rgb_rle_2frame too); when --files holds
duplicates, the last file with a given SOP Instance UID is the expected one
and a warning is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path

import requests
from pydicom import dcmread

try:
    from dicomweb_client.api import DICOMwebClient
except ImportError:  # older layout
    from dicomweb_client import DICOMwebClient  # type: ignore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TimeoutSession(requests.Session):
    def __init__(self, timeout):
        super().__init__()
        self._timeout = timeout

    def request(self, *a, **kw):
        kw.setdefault("timeout", self._timeout)
        return super().request(*a, **kw)


def jget(obj: dict, tag: str):
    """First value of a tag in a DICOM JSON object (None if absent)."""
    v = (obj or {}).get(tag, {}).get("Value")
    return v[0] if v else None


class Checker:
    def __init__(self, verbose=False):
        self.checks = []
        self.warnings = []
        self.verbose = verbose

    def add(self, name, ok, target=None, detail=None):
        self.checks.append({"check": name, "ok": bool(ok), "target": target, "detail": detail})
        if self.verbose:
            print(f"{'PASS' if ok else 'FAIL'} {name} {target or ''} {detail or ''}", file=sys.stderr)

    def run(self, name, target, fn):
        """fn() -> (ok, detail); exceptions become failures."""
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"{type(e).__name__}: {e}"
            if self.verbose:
                traceback.print_exc()
        self.add(name, ok, target, detail)
        return ok


def load(files):
    by_sop = OrderedDict()
    warn = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(f)  # raises on unreadable input -> exit 2
        sop = str(ds.SOPInstanceUID)
        if sop in by_sop:
            warn.append(f"{f}: SOP Instance UID {sop} also in {by_sop[sop]['file']}; the last one is expected")
        by_sop[sop] = {"file": str(f), "ds": ds, "sop": sop,
                       "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
                       "patient": str(ds.get("PatientID", "") or ""),
                       "date": str(ds.get("StudyDate", "") or ""),
                       "pixel": ds.get("PixelData")}
    return by_sop, warn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DICOMweb end-to-end check against Carina.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--url", required=True, help="Carina base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--base", default=None, help="DICOMweb root (default URL + /dicomweb)")
    ap.add_argument("--files", nargs="+", required=True)
    ap.add_argument("--no-rendered", action="store_true", help="skip the /rendered check")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--header", action="append", default=[], metavar="K:V",
                    help="extra HTTP header (e.g. Authorization: Bearer x); repeatable")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    base = args.base or args.url.rstrip("/") + "/dicomweb"
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    try:
        inst, warn = load(args.files)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"cannot read input: {type(e).__name__}: {e}"}))
        return 2
    chk = Checker(args.verbose)
    chk.warnings.extend(warn)
    client = DICOMwebClient(url=base, session=TimeoutSession(args.timeout), headers=headers or None)

    studies = OrderedDict()   # study -> {series -> [sop]}
    for i in inst.values():
        studies.setdefault(i["study"], OrderedDict()).setdefault(i["series"], []).append(i["sop"])

    # ---- STOW
    try:
        resp = client.store_instances([i["ds"] for i in inst.values()])
    except requests.exceptions.ConnectionError as e:
        print(json.dumps({"ok": False, "base": base, "error": f"server unreachable: {e}"}))
        return 2
    except Exception as e:  # noqa: BLE001
        resp = None
        chk.add("stow", False, None, f"{type(e).__name__}: {e}")
    if resp is not None:
        refs = {str(it.get("ReferencedSOPInstanceUID", "")) for it in resp.get("ReferencedSOPSequence", [])}
        failed = {str(it.get("ReferencedSOPInstanceUID", "")): it.get("FailureReason")
                  for it in resp.get("FailedSOPSequence", [])}
        for sop in inst:
            ok = sop in refs and sop not in failed
            det = None if ok else (f"FailedSOPSequence FailureReason={failed[sop]}" if sop in failed
                                   else "not in ReferencedSOPSequence")
            chk.add("stow", ok, sop, det)

    # ---- QIDO
    by_patient = OrderedDict()
    for i in inst.values():
        if i["patient"]:
            by_patient.setdefault(i["patient"], set()).add(i["study"])
    for pid, want in by_patient.items():
        def f(pid=pid, want=want):
            got = {jget(r, "0020000D") for r in client.search_for_studies(search_filters={"PatientID": pid})}
            miss = want - got
            return not miss, (f"missing studies {sorted(miss)}; got {len(got)}" if miss else f"{len(got)} studies")
        chk.run("qido_studies_patient", pid, f)

    dates = sorted(i["date"] for i in inst.values() if len(i["date"]) == 8)
    if dates:
        want = {i["study"] for i in inst.values() if len(i["date"]) == 8}
        rng = f"{dates[0]}-{dates[-1]}"

        def f(rng=rng, want=want):
            got = {jget(r, "0020000D") for r in client.search_for_studies(
                search_filters={"StudyDate": rng})}
            miss = want - got
            return not miss, (f"StudyDate={rng}: missing {sorted(miss)}" if miss else f"StudyDate={rng}: {len(got)} studies")
        chk.run("qido_studies_date", rng, f)
        # a range that should exclude everything stored
        def g(want=want):
            got = {jget(r, "0020000D") for r in client.search_for_studies(
                search_filters={"StudyDate": "18000101-18000102"})}
            bad = want & got
            return not bad, (f"StudyDate outside range matched {sorted(bad)}" if bad else None)
        chk.run("qido_studies_date_excludes", "18000101-18000102", g)

    for st, series in studies.items():
        def f(st=st, series=series):
            got = {jget(r, "0020000E") for r in client.search_for_series(study_instance_uid=st)}
            miss = set(series) - got
            return not miss, (f"missing series {sorted(miss)}" if miss else f"{len(got)} series")
        chk.run("qido_series", st, f)
        for se, sops in series.items():
            def g(se=se):
                got = {jget(r, "0020000E") for r in client.search_for_series(
                    search_filters={"SeriesInstanceUID": se})}
                return se in got, (None if se in got else f"got {sorted(x for x in got if x)}")
            chk.run("qido_series_all", se, g)

            def h(st=st, se=se, sops=sops):
                got = {jget(r, "00080018") for r in client.search_for_instances(
                    study_instance_uid=st, series_instance_uid=se)}
                miss = set(sops) - got
                return not miss, (f"missing {sorted(miss)}" if miss else f"{len(got)} instances")
            chk.run("qido_instances", se, h)

    for sop in inst:
        def f(sop=sop):
            got = {jget(r, "00080018") for r in client.search_for_instances(
                search_filters={"SOPInstanceUID": sop})}
            return sop in got, (None if sop in got else f"got {sorted(x for x in got if x)}")
        chk.run("qido_instances_all", sop, f)

    # ---- WADO
    for sop, i in inst.items():
        def f(i=i):
            ds = client.retrieve_instance(i["study"], i["series"], i["sop"])
            if str(ds.get("SOPInstanceUID")) != i["sop"]:
                return False, f"SOPInstanceUID {ds.get('SOPInstanceUID')}"
            got = ds.get("PixelData")
            if (got is None) != (i["pixel"] is None):
                return False, "PixelData presence differs"
            if got is not None and bytes(got) != bytes(i["pixel"]):
                ts_in = str(i["ds"].file_meta.get("TransferSyntaxUID", ""))
                ts_out = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
                return False, (f"PixelData differs ({len(got)} vs {len(i['pixel'])} bytes; "
                               f"transfer syntax sent {ts_in}, got {ts_out})")
            return True, None
        chk.run("wado_instance", sop, f)

        def g(i=i):
            md = client.retrieve_instance_metadata(i["study"], i["series"], i["sop"])
            got = jget(md, "00080018")
            return got == i["sop"], (None if got == i["sop"] else f"SOPInstanceUID {got}")
        chk.run("wado_instance_metadata", sop, g)

        if not args.no_rendered:
            def h(i=i):
                body = client.retrieve_instance_rendered(i["study"], i["series"], i["sop"],
                                                         media_types=("image/png",))
                ok = bytes(body[:8]) == PNG_MAGIC
                return ok, (f"{len(body)} bytes" if ok else f"not a PNG: {bytes(body[:16])!r}")
            chk.run("wado_rendered", sop, h)

    for st, series in studies.items():
        for se, sops in series.items():
            def f(st=st, se=se, sops=sops):
                md = client.retrieve_series_metadata(st, se)
                got = {jget(m, "00080018") for m in md}
                miss = set(sops) - got
                return not miss, (f"missing {sorted(miss)}" if miss else f"{len(md)} instances")
            chk.run("wado_series_metadata", se, f)

        def g(st=st, series=series):
            dss = client.retrieve_study(st)
            got = {str(d.get("SOPInstanceUID")) for d in dss}
            want = {s for sops in series.values() for s in sops}
            miss = want - got
            return not miss, (f"missing {sorted(miss)}; got {len(dss)}" if miss else f"{len(dss)} instances")
        chk.run("wado_study", st, g)

    failed = [c for c in chk.checks if not c["ok"]]
    out = {"ok": not failed, "base": base, "files": len(args.files),
           "passed": len(chk.checks) - len(failed), "failed": len(failed),
           "warnings": chk.warnings, "checks": chk.checks}
    print(json.dumps(out, indent=1))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
