#!/usr/bin/env python3
"""Writes N copies of a DICOM file, each with a new SOP Instance UID, for the durability tests.

  make_instances.py SRC OUTDIR N [--per-study K]

Prints one line per file: `NAME SOP_INSTANCE_UID STUDY_INSTANCE_UID`. Copies share a Study Instance UID in groups of K (default 10) and get new Series UIDs per
study. Patient attributes are left as they are (the tests check they never reach the log).
"""
import argparse
import os

from pydicom import dcmread
from pydicom.uid import generate_uid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("n", type=int)
    ap.add_argument("--per-study", type=int, default=10)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ds = dcmread(a.src)
    study = series = None
    for i in range(a.n):
        if i % a.per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        name = f"{i:05d}.dcm"
        ds.save_as(os.path.join(a.out, name))
        print(name, ds.SOPInstanceUID, study)


if __name__ == "__main__":
    main()
