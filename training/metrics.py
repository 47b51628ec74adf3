"""Classification metrics used in model cards (numpy + scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def ece(probs, y, bins=15):
    """Expected calibration error of the top-label confidence (equal-width bins)."""
    conf = probs.max(1)
    pred = probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            e += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(e)


def confusion(y, pred, k):
    cm = np.zeros((k, k), dtype=int)
    for a, b in zip(y, pred):
        cm[a, b] += 1
    return cm


def multiclass_report(probs, y, classes):
    k = len(classes)
    pred = probs.argmax(1)
    cm = confusion(y, pred, k)
    out = {"n": int(len(y)), "accuracy": float((pred == y).mean()), "confusion_matrix": cm.tolist(),
           "confusion_rows_true_cols_pred": classes, "ece_15bins": ece(probs, y),
           "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)))), "per_class": {}}
    aucs = []
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        d = {"n": int(cm[c].sum()),
             "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
             "specificity": float(tn / (tn + fp)) if tn + fp else None,
             "ppv": float(tp / (tp + fp)) if tp + fp else None}
        yb = (y == c).astype(int)
        if 0 < yb.sum() < len(yb):
            d["auc_ovr"] = float(roc_auc_score(yb, probs[:, c]))
            aucs.append(d["auc_ovr"])
        out["per_class"][name] = d
    out["macro_auc_ovr"] = float(np.mean(aucs)) if len(aucs) == k else None
    return out
