#!/usr/bin/env python3
"""Minimal DIMSE SCU (pynetdicom 3) for testing Carina's DICOM listener.

  dimse_client.py echo  --host H --port P [--aet CALLING] [--aec CARINA]
  dimse_client.py store --host H --port P [--aet CALLING] [--aec CARINA]
                        [--ts default|explicit|implicit|jpeg-baseline|all] [--raw]
                        FILE...

Output: JSON lines on stdout.
  echo:   {"op":"echo","status":0}            (status = C-ECHO-RSP Status, int)
  store:  {"file":"x.dcm","sop_instance_uid":"1.2..","status":0,"error":null}
          one line per file; status is the C-STORE-RSP Status as int (0 = success,
          0xB000.. warnings, 0xA7xx/0xA9xx/0xCxxx failures) or null when no
          response came (then error says why: no accepted presentation context,
          unreadable file, association aborted, ...).
  association rejected (both ops):
          {"op":"associate","rejected":true,"result":1,"source":1,"reason":3}
          (A-ASSOCIATE-RJ result / source / reason-diag, PS3.8 9.3.4)
  association aborted or connection failed:
          {"op":"associate","rejected":false,"error":"..."}

Exit status:
  echo:  0 C-ECHO success, 1 C-ECHO answered with a non-zero status or no answer,
  store: 0 it ran (whatever the per-file statuses were),
  both:  2 could not connect / aborted, 3 association rejected, 64 usage error.

Presentation contexts proposed for store (--ts), one context per
(SOP class of a file, transfer syntax) so the SCP can accept each separately:
  default        the file's own transfer syntax + Explicit VR LE + Implicit VR LE
  explicit       Explicit VR Little Endian only
  implicit       Implicit VR Little Endian only
  jpeg-baseline  JPEG Baseline (1.2.840.10008.1.2.4.50) only
  all            file's own + Explicit LE + Implicit LE + Explicit BE + Deflated
                 + JPEG Baseline / Extended / Lossless SV1 / Lossless +
                 JPEG-LS lossless/near + JPEG 2000 lossless/lossy + RLE
The SOP class is the file's (0008,0016) (or (0002,0002)).  pynetdicom converts
between uncompressed transfer syntaxes when the file's own was not accepted;
compressed data are never transcoded (the file then gets an error line).
--raw sends each file's data set bytes exactly as they are in the file
(pynetdicom's chunked mode; needs its exact transfer syntax to be accepted and
works for files pydicom cannot parse, e.g. tests/fixtures/dicom-bad).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

try:
    from pynetdicom import AE, _config, debug_logger  # noqa: F401
    from pynetdicom.sop_class import Verification
except ImportError as e:  # pragma: no cover
    print(json.dumps({"op": "import", "error": str(e)}))
    sys.exit(64)

ALL_EXTRA = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
             DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit,
             JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
             JPEG2000Lossless, JPEG2000, RLELossless]
MAX_CONTEXTS = 128


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def make_ae(args) -> AE:
    ae = AE(ae_title=args.aet)
    ae.acse_timeout = args.timeout
    ae.dimse_timeout = args.timeout
    ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    if args.max_pdu is not None:
        ae.maximum_pdu_size = args.max_pdu
    return ae


def associate(ae: AE, args):
    """Returns (assoc, exit_code_or_None)."""
    assoc = ae.associate(args.host, args.port, ae_title=args.aec,
                         max_pdu=args.max_pdu if args.max_pdu is not None else 16382)
    if assoc.is_established:
        return assoc, None
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        emit({"op": "associate", "rejected": True,
              "result": int(prim.result) if prim is not None and prim.result is not None else None,
              "source": int(prim.result_source) if prim is not None and prim.result_source is not None else None,
              "reason": int(prim.diagnostic) if prim is not None and prim.diagnostic is not None else None})
        return None, 3
    why = "aborted or closed by peer without A-ASSOCIATE-AC/RJ"
    try:  # only after a failure: tell "nothing listening" apart from an abort
        socket.create_connection((args.host, args.port), timeout=min(args.timeout, 5)).close()
    except OSError as e:
        why = f"connect failed: {e}"
    emit({"op": "associate", "rejected": False, "error": why})
    return None, 2


def status_of(rsp):
    """(status int or None, error or None) from a response status Dataset."""
    if rsp is None or "Status" not in rsp:
        return None, "no response (association aborted, timed out or invalid response)"
    st = int(rsp.Status)
    err = None
    if "ErrorComment" in rsp and rsp.ErrorComment:
        err = str(rsp.ErrorComment) if st != 0 else None
    return st, err


def cmd_echo(args) -> int:
    ae = make_ae(args)
    ae.add_requested_context(Verification)
    assoc, code = associate(ae, args)
    if assoc is None:
        return code
    try:
        st, err = status_of(assoc.send_c_echo())
    finally:
        if assoc.is_established:
            assoc.release()
    out = {"op": "echo", "status": st}
    if err:
        out["error"] = err
    emit(out)
    return 0 if st == 0 else 1


def file_info(path: Path):
    """(sop_class, sop_instance, ts, dataset-or-None, error-or-None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True)
        fm = getattr(ds, "file_meta", None)
        ts = fm.get("TransferSyntaxUID") if fm is not None else None
        sop_class = ds.get("SOPClassUID") or (fm.get("MediaStorageSOPClassUID") if fm is not None else None)
        sop_inst = ds.get("SOPInstanceUID") or (fm.get("MediaStorageSOPInstanceUID") if fm is not None else None)
        return (str(sop_class) if sop_class else None, str(sop_inst) if sop_inst else None,
                str(ts) if ts else None, ds, None)
    except Exception as e:  # noqa: BLE001
        return None, None, None, None, f"{type(e).__name__}: {e}"


def proposals(own_ts, mode):
    if mode == "explicit":
        return [ExplicitVRLittleEndian]
    if mode == "implicit":
        return [ImplicitVRLittleEndian]
    if mode == "jpeg-baseline":
        return [JPEGBaseline8Bit]
    base = [UID(own_ts)] if own_ts else []
    extra = ALL_EXTRA if mode == "all" else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return list(dict.fromkeys(base + extra))


def cmd_store(args) -> int:
    files = [Path(f) for f in args.files]
    infos = [file_info(f) for f in files]
    ae = make_ae(args)
    pairs = []
    for sop_class, _, ts, _, _ in infos:
        if sop_class:
            for t in proposals(ts, args.ts):
                pairs.append((sop_class, str(t)))
    pairs = list(dict.fromkeys(pairs))
    if len(pairs) > MAX_CONTEXTS:
        print(f"dimse_client: {len(pairs)} presentation contexts needed, max {MAX_CONTEXTS}; "
              "send fewer files/SOP classes per run or use a narrower --ts", file=sys.stderr)
        return 64
    if not pairs:  # nothing readable: still associate so raw/bad files can be tried
        pairs = [(str(Verification), str(ImplicitVRLittleEndian))]
    for sop_class, t in pairs:
        ae.add_requested_context(sop_class, t)
    if args.raw:
        _config.STORE_SEND_CHUNKED_DATASET = True
    assoc, code = associate(ae, args)
    if assoc is None:
        return code
    try:
        for path, (sop_class, sop_inst, ts, ds, err) in zip(files, infos):
            out = {"file": str(path), "sop_instance_uid": sop_inst, "status": None, "error": None}
            if not assoc.is_established:
                out["error"] = "association no longer established"
                emit(out)
                continue
            try:
                if args.raw:
                    rsp = assoc.send_c_store(path)
                elif ds is None:
                    raise ValueError(err or "unreadable file")
                else:
                    rsp = assoc.send_c_store(ds)
                out["status"], out["error"] = status_of(rsp)
            except Exception as e:  # noqa: BLE001
                out["error"] = f"{type(e).__name__}: {e}"
            emit(out)
    finally:
        if assoc.is_established:
            assoc.release()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DIMSE test client (C-ECHO / C-STORE) for Carina.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    sub = ap.add_subparsers(dest="op", required=True)

    def common(p, default_aet):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--aet", default=default_aet, help="calling AE title (ours)")
        p.add_argument("--aec", default="CARINA", help="called AE title (Carina's)")
        p.add_argument("--timeout", type=float, default=30.0, help="ACSE/DIMSE/network timeout, s")
        p.add_argument("--max-pdu", type=int, default=None, help="our maximum PDU receive size")
        p.add_argument("-v", "--verbose", action="store_true", help="pynetdicom debug log on stderr")

    common(sub.add_parser("echo", help="C-ECHO"), "ECHOSCU")
    ps = sub.add_parser("store", help="C-STORE files")
    common(ps, "STORESCU")
    ps.add_argument("--ts", choices=["default", "explicit", "implicit", "jpeg-baseline", "all"],
                    default="default")
    ps.add_argument("--raw", action="store_true",
                    help="send the file's bytes unparsed (exact transfer syntax needed)")
    ps.add_argument("files", nargs="+")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 64 if e.code not in (0, None) else 0
    if args.verbose:
        debug_logger()
    if args.op == "echo":
        return cmd_echo(args)
    return cmd_store(args)


if __name__ == "__main__":
    sys.exit(main())
