"""Train, cross-validate and export the lab-result risk model (models/icu-mortality-risk/).

One command (seconds):
    nice -n 10 /work/venv-train/bin/python training/train_icu.py
Data: ../shared/data/icu/yan2020_tongji_patient_first.csv (Yan et al. 2020, MIT). The outcome is
IN-HOSPITAL DEATH of COVID-19 in-patients (not ICU admission: see DATA.md). Writes
models/icu-mortality-risk/{model.onnx, model.toml, MODEL_CARD.md, metrics.json} and
docker/iris/icu_training_rows.csv (the same training rows for IntegratedML).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cxr_data import DEFAULT_DATA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "icu-mortality-risk"
VERSION = "1.0.0"
# Feature contract: column in the source table, manifest entry. Order = ONNX input column order.
FEATURES = [
    dict(col="age", name="age", loinc="30525-0", unit="a", display="Age", iris="Age",
         alternative_units=[("mo", 1 / 12)], plausible_min=0.0, plausible_max=120.0, missing="reject"),
    dict(col="ldh", name="ldh", loinc="2532-0", unit="U/L", display="Lactate dehydrogenase [Enzymatic activity/volume] in Serum or Plasma",
         iris="Ldh", alternative_units=[("ukat/L", 60.0), ("nkat/L", 0.06), ("IU/L", 1.0)],
         plausible_min=20.0, plausible_max=10000.0, missing="median"),
    dict(col="lymphocytes_pct", name="lymphocytes_pct", loinc="736-9", unit="%",
         display="Lymphocytes/100 leukocytes in Blood by Automated count", iris="LymphocytesPct",
         alternative_units=[("1", 100.0), ("/100{WBCs}", 1.0)], plausible_min=0.0, plausible_max=100.0, missing="median"),
    dict(col="hs_crp", name="hs_crp", loinc="30522-7", unit="mg/L",
         display="C reactive protein [Mass/volume] in Serum or Plasma by High sensitivity method", iris="HsCrp",
         alternative_units=[("mg/dL", 10.0), ("ug/mL", 1.0), ("mg/100mL", 10.0)],
         plausible_min=0.0, plausible_max=1000.0, missing="median"),
]
OUTCOME = "outcome_death"
THRESHOLDS = {"moderate": 0.2, "high": 0.5}


def candidates(seed):
    return {
        "logistic_regression": Pipeline([
            ("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=1.0, max_iter=2000))]),
        "gradient_boosting": Pipeline([
            ("impute", SimpleImputer(strategy="median")),
            ("clf", GradientBoostingClassifier(n_estimators=150, max_depth=2, learning_rate=0.05, subsample=0.8,
                                               min_samples_leaf=10, random_state=seed))]),
    }


def calib_bins(p, y, edges=(0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0)):
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "n": int(m.sum()), "mean_predicted": float(p[m].mean()),
                         "observed_rate": float(y[m].mean())})
    return rows


def calib_slope_intercept(p, y):
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], y)
    slope = float(lr.coef_[0, 0])
    # calibration-in-the-large (approximation): logit(observed rate) - logit(mean predicted risk)
    citl = float(np.log(y.mean() / (1 - y.mean())) - np.log(p.mean() / (1 - p.mean())))
    return slope, citl


def at_threshold(p, y, t):
    pred = (p >= t).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum()); fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum()); tn = int(((pred == 0) & (y == 0)).sum())
    return {"threshold": t, "confusion_matrix": [[tn, fp], [fn, tp]], "rows_true_cols_pred": ["survived", "died"],
            "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None, "accuracy": (tp + tn) / len(y)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--seed", type=int, default=2020)
    args = ap.parse_args()
    t0 = time.time()
    df = pd.read_csv(Path(args.data) / "icu" / "yan2020_tongji_patient_first.csv")
    cols = [f["col"] for f in FEATURES]
    X = df[cols].to_numpy(dtype=np.float64)
    y = df[OUTCOME].to_numpy(dtype=int)
    # plausibility: values outside the contract's range are treated as missing (as the service would reject them)
    for j, f in enumerate(FEATURES):
        bad = (X[:, j] < f["plausible_min"]) | (X[:, j] > f["plausible_max"])
        X[bad, j] = np.nan
    print(f"{len(y)} patients, {y.sum()} died ({y.mean():.1%}); missing per feature "
          f"{dict(zip(cols, np.isnan(X).sum(0).tolist()))}")

    # 5-fold stratified CV (repeated 10x for a stable mean; the first repeat gives the OOF predictions)
    rskf = RepeatedStratifiedKFold(n_splits=5, n_repeats=10, random_state=args.seed)
    cv = {}
    for name, est in candidates(args.seed).items():
        aucs = []
        for tr, te in rskf.split(X, y):
            m = clone(est).fit(X[tr], y[tr])
            aucs.append(roc_auc_score(y[te], m.predict_proba(X[te])[:, 1]))
        cv[name] = {"auc_mean": float(np.mean(aucs)), "auc_sd": float(np.std(aucs)), "n_folds": len(aucs)}
        print(f"{name}: 5-fold CV AUC {np.mean(aucs):.4f} +- {np.std(aucs):.4f} (10 repeats)")
    # prefer the simpler logistic regression unless boosting is clearly better
    chosen = "logistic_regression"
    if cv["gradient_boosting"]["auc_mean"] > cv["logistic_regression"]["auc_mean"] + 0.01:
        chosen = "gradient_boosting"
    est = candidates(args.seed)[chosen]
    oof = np.zeros(len(y))
    fold_aucs = []
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=args.seed).split(X, y):
        m = clone(est).fit(X[tr], y[tr])
        oof[te] = m.predict_proba(X[te])[:, 1]
        fold_aucs.append(float(roc_auc_score(y[te], oof[te])))
    slope, citl = calib_slope_intercept(oof, y)
    # age-only and labs-only baselines (does age help?)
    abl = {}
    for label, idx in {"labs_only": [1, 2, 3], "age_only": [0]}.items():
        a = []
        for tr, te in rskf.split(X, y):
            mm = clone(candidates(args.seed)[chosen]).fit(X[tr][:, idx], y[tr])
            a.append(roc_auc_score(y[te], mm.predict_proba(X[te][:, idx])[:, 1]))
        abl[label] = float(np.mean(a))
    final = clone(est).fit(X, y)
    medians = final.named_steps["impute"].statistics_
    metrics = {
        "model": NAME, "version": VERSION, "chosen": chosen, "n": int(len(y)), "n_died": int(y.sum()),
        "cv_repeated": cv, "cv_auc_5fold": float(roc_auc_score(y, oof)), "cv_fold_aucs": fold_aucs,
        "cv_brier": float(brier_score_loss(y, oof)), "cv_calibration_slope": slope,
        "cv_calibration_in_the_large": citl, "cv_calibration_bins": calib_bins(oof, y),
        "cv_at_threshold": {k: at_threshold(oof, y, t) for k, t in THRESHOLDS.items()},
        "risk_band_counts": {
            "low": {"n": int((oof < THRESHOLDS["moderate"]).sum()), "died": int(y[oof < THRESHOLDS["moderate"]].sum())},
            "moderate": {"n": int(((oof >= THRESHOLDS["moderate"]) & (oof < THRESHOLDS["high"])).sum()),
                         "died": int(y[(oof >= THRESHOLDS["moderate"]) & (oof < THRESHOLDS["high"])].sum())},
            "high": {"n": int((oof >= THRESHOLDS["high"]).sum()), "died": int(y[oof >= THRESHOLDS["high"]].sum())}},
        "ablation_cv_auc": abl,
        "imputation_medians": dict(zip(cols, [float(v) for v in medians])),
    }
    if chosen == "logistic_regression":
        sc, clf = final.named_steps["scale"], final.named_steps["clf"]
        metrics["coefficients_per_raw_unit"] = dict(zip(cols, (clf.coef_[0] / sc.scale_).tolist()))
        metrics["odds_ratio_per_sd"] = dict(zip(cols, np.exp(clf.coef_[0]).tolist()))
        metrics["intercept_raw"] = float(clf.intercept_[0] - (clf.coef_[0] * sc.mean_ / sc.scale_).sum())

    # ONNX
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    import onnx
    import onnxruntime as ort

    out = ROOT / "models" / NAME
    out.mkdir(parents=True, exist_ok=True)
    onx = convert_sklearn(final, initial_types=[("input", FloatTensorType([None, len(FEATURES)]))],
                          options={id(final.named_steps["clf"]): {"zipmap": False}},
                          target_opset={"": 17, "ai.onnx.ml": 3})
    onx.producer_name = "carina-training"
    onx.graph.name = NAME  # skl2onnx puts a random uuid here; fixed for byte-reproducible files
    onnx.checker.check_model(onx)
    onnx.save(onx, out / "model.onnx")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    assert outs == ["label", "probabilities"], outs
    Xi = np.where(np.isnan(X), medians, X).astype(np.float32)
    po = sess.run(["probabilities"], {"input": Xi})[0]
    diff = float(np.abs(po[:, 1] - final.predict_proba(Xi.astype(np.float64))[:, 1]).max())
    metrics["onnx_vs_sklearn_max_abs_diff"] = diff
    assert diff < 1e-4, diff
    # NaN input also works (imputer is inside the graph)
    pn = sess.run(["probabilities"], {"input": np.array([[70, np.nan, np.nan, np.nan]], dtype=np.float32)})[0]
    metrics["example_age70_labs_missing"] = float(pn[0, 1])
    ex = {"age 45, LDH 220, lymph 30 %, hsCRP 3": [45, 220, 30, 3],
          "age 62, LDH 350, lymph 13 %, hsCRP 54 (medians)": [62, 350, 13, 54],
          "age 75, LDH 700, lymph 4 %, hsCRP 150": [75, 700, 4, 150]}
    metrics["examples"] = {k: float(sess.run(["probabilities"], {"input": np.array([v], dtype=np.float32)})[0][0, 1])
                           for k, v in ex.items()}
    metrics["wall_seconds"] = time.time() - t0
    metrics["versions"] = {"scikit-learn": __import__("sklearn").__version__, "skl2onnx": __import__("skl2onnx").__version__,
                           "onnxruntime": ort.__version__}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "model.toml").write_text(manifest(metrics, medians))
    from icu_card import write_card

    write_card(out / "MODEL_CARD.md", metrics, FEATURES, THRESHOLDS)
    write_iris_rows(df, X, y, medians)
    at = metrics["cv_at_threshold"]["high"]
    print(f"chosen {chosen}: OOF 5-fold AUC {metrics['cv_auc_5fold']:.4f}, Brier {metrics['cv_brier']:.4f}, "
          f"slope {slope:.2f}, CITL {citl:.3f}; at 0.5: cm {at['confusion_matrix']} sens {at['sensitivity']:.3f} "
          f"spec {at['specificity']:.3f}; ablation {abl}; ONNX diff {diff:.1e}")


def manifest(m, medians):
    def q(s):
        return json.dumps(s, ensure_ascii=False)

    s = f"""name = "{NAME}"
version = "{VERSION}"
task = "tabular-risk"
description = {q("Demo risk model: probability of in-hospital death of adult COVID-19 in-patients from age, LDH, lymphocyte % and hs-CRP (Yan et al. 2020 data, Wuhan). Predicts in-hospital death, NOT ICU admission. Not for clinical use.")}
file = "model.onnx"

[input]
name = "input"
shape = [1, {len(FEATURES)}]
"""
    for f, med in zip(FEATURES, medians):
        alts = ", ".join(f"{{ unit = {q(u)}, factor = {fac!r} }}" for u, fac in f["alternative_units"])
        s += f"""
[[features]]
name = {q(f['name'])}
loinc = {q(f['loinc'])}
unit = {q(f['unit'])}
display = {q(f['display'])}
alternative_units = [{alts}]
plausible_min = {f['plausible_min']!r}
plausible_max = {f['plausible_max']!r}
missing = {q(f['missing'])}
"""
        if f["missing"] == "median":
            s += f"impute = {float(med)!r}\n"
    at = m["cv_at_threshold"]["high"]
    s += f"""
[outcome]
display = "In-hospital death (critical outcome)"
system = "http://snomed.info/sct"
code = "419099009"

[output]
probability = "probabilities"
positive_index = 1

[thresholds]
moderate = {THRESHOLDS['moderate']!r}
high = {THRESHOLDS['high']!r}

[provenance]
training_data = {q(f"{m['n']} COVID-19 in-patients of Tongji Hospital, Wuhan, Jan-Feb 2020 (Yan et al., Nat Mach Intell 2020; HAIRLAB/Pre_Surv_COVID_19, MIT); first value of each lab per stay; see MODEL_CARD.md")}
card = "MODEL_CARD.md"
trained_by = "training/train_icu.py"

[provenance.metrics]
cv_auc_5fold = {round(m['cv_auc_5fold'], 4)!r}
cv_auc_repeated_mean = {round(m['cv_repeated'][m['chosen']]['auc_mean'], 4)!r}
cv_auc_repeated_sd = {round(m['cv_repeated'][m['chosen']]['auc_sd'], 4)!r}
cv_brier = {round(m['cv_brier'], 4)!r}
cv_calibration_slope = {round(m['cv_calibration_slope'], 3)!r}
cv_calibration_in_the_large = {round(m['cv_calibration_in_the_large'], 3)!r}
cv_sensitivity_at_high = {round(at['sensitivity'], 4)!r}
cv_specificity_at_high = {round(at['specificity'], 4)!r}
cv_tn_at_high = {at['confusion_matrix'][0][0]}
cv_fp_at_high = {at['confusion_matrix'][0][1]}
cv_fn_at_high = {at['confusion_matrix'][1][0]}
cv_tp_at_high = {at['confusion_matrix'][1][1]}
cv_sensitivity_at_moderate = {round(m['cv_at_threshold']['moderate']['sensitivity'], 4)!r}
cv_specificity_at_moderate = {round(m['cv_at_threshold']['moderate']['specificity'], 4)!r}
n_patients = {m['n']}
n_died = {m['n_died']}
"""
    tomllib.loads(s)
    return s


def write_iris_rows(df, X, y, medians):
    """docker/iris/icu_training_rows.csv: the exact rows the local model was fitted on, after the
    same plausibility filter and median imputation the service applies before scoring."""
    d = ROOT / "docker" / "iris"
    d.mkdir(parents=True, exist_ok=True)
    Xi = np.where(np.isnan(X), medians, X)
    rows = pd.DataFrame({"PatientId": df["patient_id"]})
    for j, f in enumerate(FEATURES):
        rows[f["iris"]] = np.round(Xi[:, j], 4)
    rows["OutcomeDeath"] = y
    rows.to_csv(d / "icu_training_rows.csv", index=False)


if __name__ == "__main__":
    main()
