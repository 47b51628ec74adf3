"""MODEL_CARD.md writer for the ICU / mortality risk model (figures from the same run's metrics)."""
from __future__ import annotations


def write_card(path, m, features, thresholds):
    cv = m["cv_repeated"]
    hi, mo = m["cv_at_threshold"]["high"], m["cv_at_threshold"]["moderate"]

    def cm(a):
        (tn, fp), (fn, tp) = a["confusion_matrix"]
        return (f"| true \\ predicted | survived (< {a['threshold']}) | died (>= {a['threshold']}) |\n|---|---|---|\n"
                f"| survived | {tn} | {fp} |\n| died | {fn} | {tp} |\n")

    feat_rows = "\n".join(
        f"| `{f['name']}` | {f['display']} | {f['loinc']} | `{f['unit']}` | "
        + (", ".join(f"`{u}` x {fac:g}" for u, fac in f["alternative_units"]) or "-")
        + f" | {f['plausible_min']:g} - {f['plausible_max']:g} | {f['missing']}"
        + (f" ({m['imputation_medians'][f['col']]:g})" if f["missing"] == "median" else "") + " |"
        for f in features)
    bins = "\n".join(f"| {b['bin']} | {b['n']} | {b['mean_predicted']:.3f} | {b['observed_rate']:.3f} |"
                     for b in m["cv_calibration_bins"])
    coef = ""
    if "odds_ratio_per_sd" in m:
        coef = "\n".join(f"| `{k}` | {m['odds_ratio_per_sd'][k]:.2f} | {m['coefficients_per_raw_unit'][k]:+.5f} |"
                         for k in m["odds_ratio_per_sd"])
        coef = ("\nCoefficients (logistic regression on standardised inputs):\n\n| feature | odds ratio per SD | "
                "log-odds per raw unit |\n|---|---|---|\n" + coef + f"\n\nIntercept (raw units): {m['intercept_raw']:+.4f}\n")
    rb = m["risk_band_counts"]
    txt = f"""# {m['model']} {m['version']} — lab-result risk model (in-hospital death)

**Intended use: demo, not for clinical use.** Shows how Carina turns FHIR lab Observations into a risk
score. It must not guide any patient's care.

## What it predicts — read this first

The outcome is **in-hospital death** (SNOMED CT 419099009 "Dead") of adult COVID-19 in-patients, from
the first available value of each lab during the stay. It is **not** an ICU-admission model: the only
open data set with ICU admission and raw lab units (Hannover, 56 patients, most labs drawn when the patient
was already in the ICU) is far too small and too leaky to fit one (see `../shared/data/icu/DATA.md`).
Death and ICU admission are related, but a "high" score here means "resembles patients who died in
Wuhan in early 2020", not "needs an ICU bed".

## Model

- {'Logistic regression (median imputation, standardisation, L2 C = 1)' if m['chosen'] == 'logistic_regression' else 'Gradient boosting (150 depth-2 trees, learning rate 0.05, median imputation)'};
  chosen over {'gradient boosting' if m['chosen'] == 'logistic_regression' else 'logistic regression'} by repeated 5-fold CV
  (boosting had to beat logistic regression by > 0.01 AUC to be preferred):
  logistic regression AUC {cv['logistic_regression']['auc_mean']:.3f} +- {cv['logistic_regression']['auc_sd']:.3f},
  gradient boosting {cv['gradient_boosting']['auc_mean']:.3f} +- {cv['gradient_boosting']['auc_sd']:.3f}
  (5 folds x 10 repeats). IntegratedML builds the same kinds of model (see `docker/iris/`).
- ONNX (skl2onnx, opset 17 + ai.onnx.ml 3): input `input` float32 [N, {len(features)}] in the feature order
  below, outputs `label` and `probabilities` [N, 2] (column 1 = P(death)). The imputer is inside the graph
  too (NaN -> training median), but the service should apply the manifest's missing-value policy first.
  ONNX Runtime vs scikit-learn max |difference| {m['onnx_vs_sklearn_max_abs_diff']:.1e}.

## Features (FHIR Observation contract)

| name | LOINC display | LOINC | UCUM unit | accepted alternative units (value x factor = value in unit) | plausible range | missing |
|---|---|---|---|---|---|---|
{feat_rows}

Values outside the plausible range are rejected by the service (they were set to missing before
training). Age is computed from Patient.birthDate in years (UCUM `a`). The source files carry no units;
the units are the Chinese SI conventions inferred in DATA.md (LDH median 350 U/L, hs-CRP median 54 mg/L
fit them). A plain CRP (LOINC 1988-5, mg/L) measures the same analyte in the range used here and could be
mapped onto `hs_crp`, but it was not part of the training data. Does age help? CV AUC labs only
{m['ablation_cv_auc']['labs_only']:.3f}, age only {m['ablation_cv_auc']['age_only']:.3f}, all four
{cv[m['chosen']]['auc_mean']:.3f}.
{coef}
## Results (cross-validated on the training cohort; there is no external test set in the data)

Data: {m['n']} patients, {m['n_died']} died ({m['n_died'] / m['n']:.1%}). Stratified 5-fold CV,
out-of-fold predictions (seed fixed):

- **AUC {m['cv_auc_5fold']:.3f}** (pooled out-of-fold; per fold {', '.join(f'{a:.3f}' for a in m['cv_fold_aucs'])});
  repeated 5-fold x 10: {cv[m['chosen']]['auc_mean']:.3f} +- {cv[m['chosen']]['auc_sd']:.3f}.
- Calibration: Brier {m['cv_brier']:.3f}; calibration slope {m['cv_calibration_slope']:.2f} (1 = ideal);
  calibration-in-the-large {m['cv_calibration_in_the_large']:+.3f} (logit scale).

| predicted risk bin | n | mean predicted | observed death rate |
|---|---|---|---|
{bins}

Thresholds (manifest `[thresholds]`): low < {thresholds['moderate']}, moderate {thresholds['moderate']}-{thresholds['high']}, high >= {thresholds['high']}.
Out-of-fold: low {rb['low']['n']} patients ({rb['low']['died']} died), moderate {rb['moderate']['n']}
({rb['moderate']['died']} died), high {rb['high']['n']} ({rb['high']['died']} died).

Confusion matrix at the "high" threshold {hi['threshold']} (sensitivity {hi['sensitivity']:.3f}, specificity {hi['specificity']:.3f},
PPV {hi['ppv']:.3f}, NPV {hi['npv']:.3f}):

{cm(hi)}
At the "moderate" threshold {mo['threshold']} (sensitivity {mo['sensitivity']:.3f}, specificity {mo['specificity']:.3f}):

{cm(mo)}
Example outputs: {"; ".join(f"{k}: {v:.3f}" for k, v in m['examples'].items())}.

## Known biases and limits

- Single centre (Tongji Hospital, Wuhan), 10 Jan - 18 Feb 2020, early pandemic, before vaccines and
  current treatments, with a death rate of {m['n_died'] / m['n']:.0%} (the paper's own test cohort had 12 %):
  absolute risks will be far too high elsewhere. Recalibrate before any use.
- "First value during the stay" is a stand-in for admission labs; it is not guaranteed to be from day 0.
- CV on the training cohort only; the published external test cohort is not in this data set.
- Units were inferred, not given, in the source; LDH and CRP assays differ between laboratories.
- Outcome is death, not ICU admission (above).

## Data and licence

Yan L, Zhang HT, Goncalves J, et al. "An interpretable mortality prediction model for COVID-19 patients."
Nature Machine Intelligence 2, 283-288 (2020), doi:10.1038/s42256-020-0180-7. Data from GitHub
HAIRLAB/Pre_Surv_COVID_19 (commit c5befb16), MIT licence, Copyright (c) 2020 Huazhong Artificial
Intelligence Lab: "Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files ... The above copyright notice and this permission notice
shall be included in all copies or substantial portions of the Software." File used:
`icu/yan2020_tongji_patient_first.csv` (derived by the data set's preparer).

## How to retrain

```sh
nice -n 10 /work/venv-train/bin/python training/train_icu.py
```

Rewrites `models/{m['model']}/` (model.onnx, model.toml, MODEL_CARD.md, metrics.json) and
`docker/iris/icu_training_rows.csv`; takes a few seconds; seeds fixed. Versions: {m['versions']}.
The same model in InterSystems IRIS IntegratedML: `docker/iris/README.md`.
"""
    path.write_text(txt)
