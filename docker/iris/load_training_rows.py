"""Load the ICU model's training rows into InterSystems IRIS (alternative to LOAD DATA in icu_model.sql).

    python docker/iris/load_training_rows.py --csv-only            # (re)write icu_training_rows.csv only
    python docker/iris/load_training_rows.py --host localhost --port 1972 --namespace USER \
        --user _SYSTEM --password SYS                              # INSERT rows over DB-API

The CSV is written by training/train_icu.py (same plausibility filter and median imputation as the
local model); --csv-only re-runs only that export. Inserting needs the InterSystems DB-API driver
(`pip install intersystems-irispython`); it was not tested against a live IRIS here.
Create the table first (the CREATE TABLE statement at the top of icu_model.sql), or pass --create.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV = HERE / "icu_training_rows.csv"
COLUMNS = ["PatientId", "Age", "Ldh", "LymphocytesPct", "HsCrp", "OutcomeDeath"]
CREATE = """CREATE TABLE Carina.IcuTrainingRows (
    PatientId VARCHAR(32) NOT NULL, Age DOUBLE, Ldh DOUBLE, LymphocytesPct DOUBLE, HsCrp DOUBLE,
    OutcomeDeath INTEGER NOT NULL)"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv-only", action="store_true", help="regenerate the CSV (runs training/train_icu.py)")
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, default=1972)
    ap.add_argument("--namespace", default="USER")
    ap.add_argument("--user", default="_SYSTEM")
    ap.add_argument("--password", default="SYS")
    ap.add_argument("--create", action="store_true", help="CREATE TABLE before inserting")
    args = ap.parse_args()
    if args.csv_only or not CSV.exists():
        subprocess.run([sys.executable, str(HERE.parents[1] / "training" / "train_icu.py")], check=True)
        if args.csv_only:
            return
    with open(CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == COLUMNS, rows[0].keys()
    import iris  # intersystems-irispython

    conn = iris.connect(f"{args.host}:{args.port}/{args.namespace}", args.user, args.password)
    cur = conn.cursor()
    if args.create:
        cur.execute(CREATE)
    sql = f"INSERT INTO Carina.IcuTrainingRows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    for r in rows:
        cur.execute(sql, [r["PatientId"], float(r["Age"]), float(r["Ldh"]), float(r["LymphocytesPct"]),
                          float(r["HsCrp"]), int(r["OutcomeDeath"])])
    conn.commit()
    print(f"inserted {len(rows)} rows into Carina.IcuTrainingRows")
    conn.close()


if __name__ == "__main__":
    main()
