"""Train, calibrate, evaluate and export the demo chest X-ray classifier (models/cxr-resnet-small/).

One command (from the repo root; ~25-35 min on 2 CPU cores):
    nice -n 10 /work/venv-train/bin/python training/train_cxr.py
Data: ../shared/data/cxr (override with --data or $CARINA_DATA). Never reads val/ or oos/ for
training or model selection: a patient-disjoint 15 % of train ("holdout") picks the epoch and
fits the softmax temperature; val and oos are evaluated once at the end.
Writes models/<name>/{model.onnx, model.toml, MODEL_CARD.md, metrics.json, peer-manifest.json}
and tests/fixtures/models/cxr-golden/golden/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cxr_data import DEFAULT_DATA, read_labels  # noqa: E402
from cxr_models import CLASSES, ResNetSmall, export_onnx, graph_summary, raw_gradcam  # noqa: E402
from manifest import image_manifest  # noqa: E402
from metrics import multiclass_report  # noqa: E402
from preprocess import Preprocess, geometry, load_gray, normalise, preprocess_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_LABELS = ["Covid19", "Normal_Lung", "Pneumonia_Bacterial_Lung"]
GOLDEN_IMAGES = ["hannover_4d98e1de", "kermany_person1699_bacteria_4498"]  # tests/fixtures/images/


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def holdout_split(rows, frac, seed):
    """Patient-disjoint holdout of the train rows, stratified by (label, source)."""
    from sklearn.model_selection import StratifiedGroupKFold

    strat = [f"{r['label']}|{r['source']}" for r in rows]
    groups = [r["patient_id"] for r in rows]
    k = int(round(1 / frac))
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr_idx, ho_idx = next(sgkf.split(np.zeros(len(rows)), strat, groups))
    return [rows[i] for i in tr_idx], [rows[i] for i in ho_idx]


class Augment:
    """Anti-shortcut augmentation on the decoded source image, then the contract letterbox.

    - random rotation (+-8 deg) and random crop with random aspect ratio (0.75..1.33, area 60-100 %):
      changes the letterbox bars, so image shape / padding stops identifying the source;
    - random gamma / contrast / brightness (sources differ in contrast) before letterboxing, so
      the padding stays pad_value as at inference;
    - small Gaussian noise.
    """

    def __init__(self, pre: Preprocess, rng: np.random.Generator):
        self.pre, self.rng = pre, rng

    def __call__(self, img: Image.Image) -> np.ndarray:
        r = self.rng
        if r.random() < 0.7:
            img = img.rotate(float(r.uniform(-8, 8)), resample=Image.BILINEAR, expand=False, fillcolor=0)
        w, h = img.size
        area = r.uniform(0.6, 1.0)
        ar = math.exp(r.uniform(math.log(0.75), math.log(1.33)))
        cw = min(w, max(16, int(round(w * math.sqrt(area * ar)))))
        ch = min(h, max(16, int(round(h * math.sqrt(area / ar)))))
        x0 = int(r.integers(0, w - cw + 1))
        y0 = int(r.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = np.power(a, math.exp(r.uniform(math.log(0.7), math.log(1.45))))
        a = (a - 0.5) * r.uniform(0.8, 1.2) + 0.5 + r.uniform(-0.1, 0.1)
        a = np.clip(a, 0, 1)
        img = Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L")
        out = np.asarray(geometry(img, self.pre), dtype=np.float32)
        out = out + r.normal(0, 3.0, out.shape).astype(np.float32)
        return np.clip(out, 0, 255)


def to_tensor(u8_or_f32, pre):
    v = np.asarray(u8_or_f32, dtype=np.float32)
    return (v * np.float32(pre.scale) - np.float32(pre.mean[0])) / np.float32(pre.std[0])


def load_eval(rows, data, pre):
    return np.concatenate([preprocess_path(data / "cxr" / r["path"], pre) for r in rows], 0)


def predict(model, x, bs=64):
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            outs.append(model(torch.from_numpy(x[i:i + bs])))
    return torch.cat(outs).numpy()


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits, y):
    best = (1e9, 1.0)
    for t in np.exp(np.linspace(np.log(0.3), np.log(5), 300)):
        p = softmax(logits / t)
        nll = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)))
        best = min(best, (nll, float(t)))
    return best[1]


def per_source(rows, probs, y):
    out = {}
    for src in sorted({r["source"] for r in rows}):
        idx = np.array([i for i, r in enumerate(rows) if r["source"] == src])
        pred = probs[idx].argmax(1)
        d = {"n": int(len(idx)), "accuracy": float((pred == y[idx]).mean()), "by_true_label": {}}
        for c, name in enumerate(CLASSES):
            m = y[idx] == c
            if m.any():
                d["by_true_label"][name] = {
                    "n": int(m.sum()), "correct": int((pred[m] == c).sum()),
                    "predicted_as": {CLASSES[k]: int((pred[m] == k).sum()) for k in range(3)},
                    "mean_prob_covid": float(probs[idx][m, 0].mean())}
        out[src] = d
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--name", default="cxr-resnet-small")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.98, help="EMA decay per step for the evaluated weights (0 = off)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--widths", default="24,48,96,192")
    ap.add_argument("--seed", type=int, default=20260)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=38.0, help="stop training after this wall time")
    ap.add_argument("--workdir", default=os.environ.get("CARINA_RUNS", "/tmp/carina-runs"))
    ap.add_argument("--card-only", action="store_true", help="only rewrite MODEL_CARD.md from metrics.json")
    args = ap.parse_args()
    if args.card_only:
        from cxr_card import write_card

        out = ROOT / "models" / args.name
        m = json.loads((out / "metrics.json").read_text())
        for k, v in m.get("args", {}).items():
            setattr(args, k, v)
        write_card(out / "MODEL_CARD.md", m, args)
        return
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    t0 = time.time()
    log_lines = []

    def log(s):
        line = f"[{time.time() - t0:7.1f}s] {s}"
        print(line, flush=True)
        log_lines.append(line)

    data = Path(args.data)
    pre = Preprocess(height=args.size, width=args.size, resize="letterbox", pad_value=0,
                     scale=1 / 255, mean=(0.5,), std=(0.25,))
    rows = read_labels(data)
    train_all = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    oos = [r for r in rows if r["split"] == "oos"]
    tr, ho = holdout_split(train_all, 0.15, args.seed)
    assert not ({r["patient_id"] for r in tr} & {r["patient_id"] for r in ho})
    assert not ({r["patient_id"] for r in train_all} & {r["patient_id"] for r in val})
    log(f"train {len(tr)} / holdout {len(ho)} (patient-disjoint, from train) / val {len(val)} / oos {len(oos)}")

    imgs = [load_gray(data / "cxr" / r["path"]) for r in tr]
    ytr = np.array([CLASSES.index(r["label"]) for r in tr])
    xho = load_eval(ho, data, pre)
    yho = np.array([CLASSES.index(r["label"]) for r in ho])
    log("decoded images")

    widths = tuple(int(w) for w in args.widths.split(","))
    model = ResNetSmall(widths=widths)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"ResNetSmall widths={widths} params={nparams}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(tr) / args.batch)
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    counts = np.bincount(ytr, minlength=3)
    lossf = nn.CrossEntropyLoss(weight=torch.tensor(len(ytr) / (3 * counts), dtype=torch.float32),
                                label_smoothing=0.05)
    aug = Augment(pre, np.random.default_rng(args.seed))
    import copy

    ema = copy.deepcopy(model).eval() if args.ema > 0 else None

    def ema_update():
        with torch.no_grad():
            for (k, e), v in zip(ema.state_dict().items(), model.state_dict().values()):
                if e.dtype.is_floating_point:
                    e.mul_(args.ema).add_(v.detach(), alpha=1 - args.ema)
                else:
                    e.copy_(v)

    best = {"nll": 1e9}
    history = []
    run_dir = Path(args.workdir) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    t_train = time.time()
    for ep in range(args.epochs):
        model.train()
        te = time.time()
        perm = np.random.default_rng(args.seed + ep).permutation(len(tr))
        tot = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i:i + args.batch]
            if len(idx) < 2:
                continue
            xb = torch.from_numpy(np.stack([to_tensor(aug(imgs[j]), pre) for j in idx])[:, None])
            yb = torch.from_numpy(ytr[idx]).long()
            opt.zero_grad()
            loss = lossf(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema_update()
            tot += loss.item() * len(idx)
        evaluated = ema if ema is not None else model
        lho = predict(evaluated, xho)
        rep = multiclass_report(softmax(lho), yho, CLASSES)
        h = {"epoch": ep + 1, "train_loss": tot / len(tr), "holdout_nll": rep["nll"], "holdout_acc": rep["accuracy"],
             "holdout_macro_auc": rep["macro_auc_ovr"], "epoch_s": time.time() - te}
        history.append(h)
        log(f"epoch {ep + 1}/{args.epochs} loss {h['train_loss']:.4f} holdout nll {h['holdout_nll']:.4f} "
            f"acc {h['holdout_acc']:.3f} auc {h['holdout_macro_auc']:.4f} ({h['epoch_s']:.0f}s)")
        if rep["nll"] < best["nll"]:
            best = {"nll": rep["nll"], "epoch": ep + 1, "state": {k: v.clone() for k, v in evaluated.state_dict().items()}}
        if (time.time() - t_train) / 60 > args.max_minutes:
            log(f"stopping: wall-time budget of {args.max_minutes} min reached")
            break
    train_minutes = (time.time() - t_train) / 60
    model.load_state_dict(best["state"])
    model.eval()
    torch.save(best["state"], run_dir / "best.pt")
    log(f"selected epoch {best['epoch']} (holdout nll {best['nll']:.4f}); training wall time {train_minutes:.1f} min")

    # temperature scaling on holdout, folded into the last Linear so the ONNX logits are calibrated
    T = fit_temperature(predict(model, xho), yho)
    lin = model.head[-1]
    with torch.no_grad():
        lin.weight.div_(T)
        lin.bias.div_(T)
    log(f"temperature {T:.3f} (fitted on holdout, folded into the head)")

    out = ROOT / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "model.onnx", args.size, args.size)
    gs = graph_summary(out / "model.onnx")
    assert gs["pool_inputs"] == [("GlobalAveragePool", ["features"])], gs["pool_inputs"]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])

    def ort_logits(x):
        return np.concatenate([sess.run(["logits"], {"input": x[i:i + 16]})[0] for i in range(0, len(x), 16)])

    xva = load_eval(val, data, pre)
    yva = np.array([CLASSES.index(r["label"]) for r in val])
    xoos = load_eval(oos, data, pre)
    yoos = np.array([CLASSES.index(r["label"]) for r in oos])
    lva_t = predict(model, xva)
    lva = ort_logits(xva)
    maxdiff = float(np.abs(lva - lva_t).max())
    log(f"ONNX vs torch max |logit diff| on val: {maxdiff:.2e}")
    assert maxdiff < 1e-4
    pva, pho, poos = softmax(lva), softmax(ort_logits(xho)), softmax(ort_logits(xoos))
    rep_val = multiclass_report(pva, yva, CLASSES)
    rep_ho = multiclass_report(pho, yho, CLASSES)
    rep_oos = multiclass_report(poos, yoos, CLASSES)
    from sklearn.metrics import roc_auc_score

    covid_vs_pneu_oos = float(roc_auc_score((yoos == 0).astype(int), poos[:, 0]))
    metrics = {
        "model": args.name, "version": args.version, "seed": args.seed, "input_size": args.size,
        "widths": list(widths), "params": nparams, "epochs_run": len(history), "selected_epoch": best["epoch"],
        "temperature": T, "train_wall_minutes": train_minutes, "total_wall_minutes": (time.time() - t0) / 60,
        "n_train": len(tr), "n_holdout": len(ho), "onnx_vs_torch_max_abs_logit_diff": maxdiff,
        "val": rep_val, "val_per_source": per_source(val, pva, yva),
        "holdout": rep_ho,
        "oos": rep_oos, "oos_covid_vs_pneumonia_auc": covid_vs_pneu_oos, "oos_per_source": per_source(oos, poos, yoos),
        "history": history, "args": {k: v for k, v in vars(args).items() if k not in ("card_only", "workdir", "data")},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    log(f"VAL: acc {rep_val['accuracy']:.3f} macro AUC {rep_val['macro_auc_ovr']:.4f} ECE {rep_val['ece_15bins']:.3f} "
        f"cm {rep_val['confusion_matrix']}")
    log(f"OOS: acc {rep_oos['accuracy']:.3f} cm {rep_oos['confusion_matrix']} covid-vs-pneumonia AUC {covid_vs_pneu_oos:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (Path(args.workdir) / args.name / "train.log").write_text("\n".join(log_lines) + "\n")

    flat = {
        "val_accuracy": rep_val["accuracy"], "val_macro_auc": rep_val["macro_auc_ovr"], "val_ece": rep_val["ece_15bins"],
        **{f"val_sensitivity_{c}": rep_val["per_class"][c]["sensitivity"] for c in CLASSES},
        **{f"val_specificity_{c}": rep_val["per_class"][c]["specificity"] for c in CLASSES},
        **{f"val_auc_{c}": rep_val["per_class"][c]["auc_ovr"] for c in CLASSES},
        "oos_accuracy": rep_oos["accuracy"], "oos_covid_sensitivity": rep_oos["per_class"]["covid"]["sensitivity"],
        "oos_covid_vs_pneumonia_auc": covid_vs_pneu_oos, "train_wall_minutes": train_minutes,
    }
    flat = {k: round(float(v), 4) for k, v in flat.items()}
    (out / "model.toml").write_text(image_manifest(
        name=args.name, version=args.version,
        description=("Demo chest X-ray classifier (COVID-19 / no abnormality / pneumonia), ResNet-style CNN trained "
                     "from scratch on public data. NOT for clinical use; known source shortcut, see MODEL_CARD.md."),
        pre=pre, gradcam_target="features",
        training_data=(f"{len(tr)} images of ../shared/data/cxr/train (Hannover CC BY 3.0, Kermany CC BY 4.0, "
                       "NIH ChestX-ray14, ieee8023 CC BY); see MODEL_CARD.md"),
        trained_by="training/train_cxr.py", metrics=flat))
    (out / "peer-manifest.json").write_text(json.dumps({
        "model_name": f"{args.name} {args.version}", "model_path": "model.onnx", "input_name": "input",
        "input_shape": [1, 1, args.size, args.size], "input_layout": "NCHW", "color": "GRAY",
        "scale": 1 / 255, "mean": [0.5], "std": [0.25], "labels": PEER_LABELS, "probs_output": "probs",
        "output_is_logits": False, "feature_output": "features", "feature_layout": "NCHW",
        "gradcam": {"weights": "auto", "target": "logit", "guided": False}}, indent=2) + "\n")
    write_golden(model, sess, pre, args, log)
    from cxr_card import write_card

    write_card(out / "MODEL_CARD.md", metrics, args)
    log("done")


def write_golden(model, sess, pre, args, log):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class G(GradCAM):
        def get_target_width_height(self, input_tensor):
            return None

    gdir = ROOT / "tests" / "fixtures" / "models" / "cxr-golden" / "golden"
    gdir.mkdir(parents=True, exist_ok=True)
    info = {"model_dir": f"models/{args.name}", "model_name": args.name, "model_version": args.version,
            "images": {}, "classes": CLASSES,
            "preprocess": {"height": pre.height, "width": pre.width, "resize": pre.resize, "pad_value": pre.pad_value,
                           "scale": pre.scale, "mean": list(pre.mean), "std": list(pre.std)},
            "gradcam": "pytorch-grad-cam 1.5.7 GradCAM, ClassifierOutputTarget(c) on logits, target layer = "
                       "model.trunk (output 'features'), get_target_width_height -> None (no upsampling)",
            "onnx_sha256": __import__("hashlib").sha256((ROOT / "models" / args.name / "model.onnx").read_bytes()).hexdigest()}
    for key in GOLDEN_IMAGES:
        x = preprocess_path(ROOT / "tests" / "fixtures" / "images" / f"{key}.jpg", pre)
        lo, po, fo = sess.run(["logits", "probs", "features"], {"input": x})
        with torch.no_grad():
            assert np.abs(model(torch.from_numpy(x)).numpy() - lo).max() < 1e-4
        np.save(gdir / f"input_{key}.npy", x.astype(np.float32))
        np.save(gdir / f"logits_{key}.npy", lo.astype(np.float32))
        np.save(gdir / f"probs_{key}.npy", po.astype(np.float32))
        ranges = []
        for c in range(3):
            cam = G(model=model, target_layers=[model.trunk])
            m = np.ascontiguousarray(cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(c)])[0],
                                     dtype=np.float32)
            cam.activations_and_grads.release()
            np.save(gdir / f"cam_{key}_class{c}.npy", m)
            np.save(gdir / f"camraw_{key}_class{c}.npy", raw_gradcam(model, x, c))
            ranges.append(float(m.max() - m.min()))
        info["images"][key] = {"path": f"tests/fixtures/images/{key}.jpg", "argmax": CLASSES[int(po.argmax())],
                               "probs": po[0].tolist(), "cam_shape": list(m.shape), "cam_range": ranges,
                               "feature_shape": list(fo.shape)}
        log(f"golden {key}: probs {np.round(po[0], 4).tolist()} cam ranges {np.round(ranges, 3).tolist()}")
    (gdir / "golden.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
