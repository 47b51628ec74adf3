#!/usr/bin/env python3
"""Writes Carina's FHIR R4 conformance resources and examples (standard library only):

  fhir-profiles/StructureDefinition-<Name>.json     6 profiles (derivation constraint, differential)
  fhir-profiles/ValueSet-carina-finding-labels.json the SNOMED CT labels Carina reports
  fhir-profiles/examples/<Type>-carina-example.json one example instance per profile
  fhir-profiles/examples/Bundle-carina-example.json the image-analysis ones in a collection Bundle
                                                    (urn:uuid:); the RiskAssessment stands alone

    python3 fhir-profiles/generate.py

The JSON files are committed; edit this script and rerun it rather than editing them by hand, then
check them with both validators (see README.md).
"""
import base64
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = "https://carina.example.org/fhir"
SD = f"{BASE}/StructureDefinition"
VS_LABELS = f"{BASE}/ValueSet/carina-finding-labels"
VERSION = "0.1.0"
DATE = "2025-01-15"

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
RAD = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
CHEST_XR = {"system": LOINC, "code": "30745-4", "display": "XR Chest Views"}
MEDIA_IMAGE = {"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image", "display": "Image"}
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
VS_RISK_PROBABILITY = "http://hl7.org/fhir/ValueSet/risk-probability"
MODELS = f"{BASE}/CodeSystem/models"
AUTHOR = {
    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
    "code": "author",
    "display": "Author",
}
LABELS = [  # (SNOMED CT code, display) Carina's model outputs
    ("840539006", "COVID-19"),
    ("281900007", "No abnormality detected"),
    ("233604007", "Pneumonia"),
]
HEATMAP_TITLE = "Grad-CAM heatmap overlay"
DISCLAIMER = "demo, not for clinical use"


def coding(c, display=True):
    return {k: v for k, v in c.items() if display or k != "display"}


def pattern_cc(c):
    return {"coding": [coding(c, display=False)]}


def el(path, slice_name=None, **kw):
    eid = path if slice_name is None else f"{path}:{slice_name}"
    e = {"id": eid, "path": path}
    if slice_name is not None:
        e["sliceName"] = slice_name
    for k, v in kw.items():
        if k in ("min",):
            e[k] = v
        elif k == "max":
            e[k] = str(v)
        else:
            e[k] = v
    return e


def ref_type(*target_profiles):
    return [{"code": "Reference", "targetProfile": list(target_profiles)}]


def core(t):
    return f"http://hl7.org/fhir/StructureDefinition/{t}"


def security_slice(t):
    return [
        el(f"{t}.meta", min=1),
        el(
            f"{t}.meta.security",
            slicing={"discriminator": [{"type": "pattern", "path": "$this"}], "rules": "open"},
            min=1,
            short="Security labels: must include AIAST (AI asserted)",
        ),
        el(
            f"{t}.meta.security",
            "aiast",
            min=1,
            max=1,
            short="AIAST: this content was asserted by an AI model",
            patternCoding=coding(AIAST, display=False),
        ),
    ]


def structure_definition(name, title, t, description, elements):
    return {
        "resourceType": "StructureDefinition",
        "id": name,
        "url": f"{SD}/{name}",
        "version": VERSION,
        "name": name,
        "title": title,
        "status": "draft",
        "experimental": True,
        "date": DATE,
        "publisher": "Carina",
        "description": description,
        "fhirVersion": "4.0.1",
        "kind": "resource",
        "abstract": False,
        "type": t,
        "baseDefinition": core(t),
        "derivation": "constraint",
        "differential": {"element": [el(t, short=title)] + elements},
    }


def profiles():
    dr = structure_definition(
        "CarinaAIDiagnosticReport",
        "Carina AI chest X-ray DiagnosticReport",
        "DiagnosticReport",
        "The report Carina's AI model produces for one chest X-ray: the top finding as conclusion and "
        "conclusionCode, one probability Observation per label, and the Grad-CAM heatmap Media. "
        "AI-asserted (meta.security AIAST); a demo, not for clinical use.",
        security_slice("DiagnosticReport")
        + [
            el("DiagnosticReport.status", fixedCode="final"),
            el("DiagnosticReport.category", min=1, patternCodeableConcept=pattern_cc(RAD),
               short="Radiology (v2-0074 RAD)"),
            el("DiagnosticReport.code", patternCodeableConcept=pattern_cc(CHEST_XR),
               short="LOINC 30745-4 XR Chest Views"),
            el("DiagnosticReport.subject", type=ref_type(core("Patient")),
               short="The patient, when Carina knows it (from the DICOM header)"),
            el("DiagnosticReport.effective[x]", min=1, type=[{"code": "dateTime"}],
               short="When the X-ray was acquired (or analysed, if unknown)"),
            el("DiagnosticReport.issued", min=1, short="When Carina produced this report"),
            el("DiagnosticReport.result", min=1,
               type=ref_type(f"{SD}/CarinaAIProbabilityObservation"),
               short="One probability Observation per label"),
            el("DiagnosticReport.imagingStudy", type=ref_type(core("ImagingStudy")),
               short="The analysed study, when known"),
            el("DiagnosticReport.media", min=1, short="The Grad-CAM heatmap(s)"),
            el("DiagnosticReport.media.link", type=ref_type(f"{SD}/CarinaHeatmapMedia")),
            el("DiagnosticReport.conclusion", min=1, short="Text summary of the top finding and its probability"),
            el("DiagnosticReport.conclusionCode", min=1, max=1,
               short="The top finding (label with the highest probability)",
               binding={"strength": "required", "valueSet": VS_LABELS}),
        ],
    )
    obs = structure_definition(
        "CarinaAIProbabilityObservation",
        "Carina AI finding probability Observation",
        "Observation",
        "The probability (0..1) that Carina's AI model gives one label for one chest X-ray. "
        "AI-asserted (meta.security AIAST); a demo, not for clinical use.",
        security_slice("Observation")
        + [
            el("Observation.status", fixedCode="final"),
            el("Observation.category", min=1, patternCodeableConcept=pattern_cc(IMAGING),
               short="imaging (observation-category)"),
            el("Observation.code", short="The label (SNOMED CT)",
               binding={"strength": "required", "valueSet": VS_LABELS}),
            el("Observation.subject", type=ref_type(core("Patient"))),
            el("Observation.value[x]", min=1, type=[{"code": "Quantity"}],
               short="Probability of the label, 0..1"),
            el("Observation.value[x].value", min=1, minValueDecimal=0, maxValueDecimal=1),
            el("Observation.value[x].comparator", max=0),
            el("Observation.value[x].unit", min=1, fixedString="probability"),
            el("Observation.value[x].system", min=1, fixedUri=UCUM),
            el("Observation.value[x].code", min=1, fixedCode="1"),
            el("Observation.device", min=1, type=ref_type(f"{SD}/CarinaModelDevice"),
               short="The AI model that computed the probability"),
            el("Observation.derivedFrom", type=ref_type(core("ImagingStudy"), core("Media")),
               short="The analysed study or image"),
        ],
    )
    media = structure_definition(
        "CarinaHeatmapMedia",
        "Carina Grad-CAM heatmap Media",
        "Media",
        "A Grad-CAM heatmap overlay (PNG) showing where Carina's AI model looked for its top finding. "
        "AI-asserted (meta.security AIAST); a demo, not for clinical use.",
        security_slice("Media")
        + [
            el("Media.status", fixedCode="completed"),
            el("Media.type", min=1, patternCodeableConcept=pattern_cc(MEDIA_IMAGE)),
            el("Media.content",
               constraint=[{
                   "key": "carina-media-1",
                   "severity": "error",
                   "human": "The heatmap is given inline (data) or by URL (url), or both",
                   "expression": "data.exists() or url.exists()",
                   "source": f"{SD}/CarinaHeatmapMedia",
               }]),
            el("Media.content.contentType", min=1, fixedCode="image/png"),
            el("Media.content.title", min=1, fixedString=HEATMAP_TITLE),
        ],
    )
    device = structure_definition(
        "CarinaModelDevice",
        "Carina AI model Device",
        "Device",
        "The AI model (a software device) that produced Carina's results: name and version. "
        "A demo, not for clinical use.",
        [
            el("Device",
               constraint=[{
                   "key": "carina-device-1",
                   "severity": "error",
                   "human": "A note says that the model is a demo, not for clinical use",
                   "expression": f"note.where(text.contains('{DISCLAIMER}')).exists()",
                   "source": f"{SD}/CarinaModelDevice",
               }]),
            el("Device.deviceName", min=1, max=1, short="The model name"),
            el("Device.deviceName.type", fixedCode="model-name"),
            el("Device.type", min=1, patternCodeableConcept={"text": "AI model"}),
            el("Device.version", min=1, max=1, short="The model version"),
            el("Device.note", min=1, short=f"Includes '{DISCLAIMER}'"),
        ],
    )
    risk = structure_definition(
        "CarinaRiskAssessment",
        "Carina AI risk RiskAssessment",
        "RiskAssessment",
        "The risk (probability 0..1 and qualitative risk) that Carina's tabular AI model gives one "
        "outcome for one patient, from lab Observations (and age). "
        "AI-asserted (meta.security AIAST); a demo, not for clinical use.",
        security_slice("RiskAssessment")
        + [
            el("RiskAssessment.status", fixedCode="final"),
            el("RiskAssessment.method", min=1,
               short="The model: name (code) and version (display, text)"),
            el("RiskAssessment.subject", type=ref_type(core("Patient")),
               short="The patient (1..1 in the base resource)"),
            el("RiskAssessment.occurrence[x]", min=1, type=[{"code": "dateTime"}],
               short="When Carina computed the risk"),
            el("RiskAssessment.performer", min=1, type=ref_type(f"{SD}/CarinaModelDevice"),
               short="The AI model that computed the risk"),
            el("RiskAssessment.basis", type=ref_type(core("Observation")),
               short="The lab Observations used as inputs"),
            el("RiskAssessment.prediction", min=1, max=1),
            el("RiskAssessment.prediction.outcome", min=1, short="The predicted outcome"),
            el("RiskAssessment.prediction.probability[x]", min=1, type=[{"code": "decimal"}],
               minValueDecimal=0, maxValueDecimal=1, short="Probability of the outcome, 0..1"),
            el("RiskAssessment.prediction.qualitativeRisk", min=1,
               short="low, moderate or high (thresholds on the probability)",
               binding={"strength": "required", "valueSet": VS_RISK_PROBABILITY}),
            el("RiskAssessment.note", min=1,
               short=f"Includes the inputs, the backend and the disclaimer ({DISCLAIMER})"),
        ],
    )
    prov = structure_definition(
        "CarinaAIProvenance",
        "Carina AI Provenance",
        "Provenance",
        "Records that Carina's AI model (a Device) authored a Carina report and its results, or a "
        "Carina risk assessment, when, and from which input study or lab Observations.",
        [
            el("Provenance.target", min=1,
               type=ref_type(f"{SD}/CarinaAIDiagnosticReport", f"{SD}/CarinaAIProbabilityObservation",
                             f"{SD}/CarinaHeatmapMedia", f"{SD}/CarinaRiskAssessment"),
               short="The DiagnosticReport (and, optionally, its Observations and Media), "
                     "or the RiskAssessment"),
            el("Provenance.agent", min=1, max=1),
            el("Provenance.agent.type", min=1, patternCodeableConcept=pattern_cc(AUTHOR)),
            el("Provenance.agent.who", type=ref_type(f"{SD}/CarinaModelDevice")),
            el("Provenance.entity", short="The input study or lab Observations, when known"),
            el("Provenance.entity.role", fixedCode="source"),
            el("Provenance.entity.what", type=ref_type(core("ImagingStudy"), core("Media"), core("Observation"))),
        ],
    )
    return [dr, obs, media, device, risk, prov]


def value_set():
    return {
        "resourceType": "ValueSet",
        "id": "carina-finding-labels",
        "url": VS_LABELS,
        "version": VERSION,
        "name": "CarinaFindingLabels",
        "title": "Carina AI chest X-ray finding labels",
        "status": "draft",
        "experimental": True,
        "date": DATE,
        "publisher": "Carina",
        "description": "The labels Carina's AI model scores on a chest X-ray (SNOMED CT).",
        "compose": {
            "include": [{"system": SNOMED, "concept": [{"code": c, "display": d} for c, d in LABELS]}]
        },
    }


def tiny_png():
    """A valid 2x2 RGB PNG (red/transparent-ish heat colours), to stand for a heatmap."""
    w = h = 2
    raw = b"".join(b"\x00" + bytes([255, 0, 0, 255, 128, 0]) for _ in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


STUDY_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
T_ACQ = "2025-01-15T09:12:00Z"
T_RUN = "2025-01-15T10:30:00Z"
PROBS = {"840539006": 0.07, "281900007": 0.11, "233604007": 0.82}
T_RISK = "2025-01-15T11:00:00Z"
RISK_MODEL, RISK_VERSION = "icu-mortality-risk", "1.0.0"
RISK_OUTCOME = ("419099009", "In-hospital death (critical outcome)")

IDS = {  # resource id -> urn:uuid used in the Bundle (which holds exactly these resources)
    "Device/carina-example-model": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000001",
    "Media/carina-example-heatmap": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000002",
    "Observation/carina-example-prob-840539006": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000003",
    "Observation/carina-example-prob-281900007": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000004",
    "Observation/carina-example-prob-233604007": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000005",
    "DiagnosticReport/carina-example-report": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000006",
    "Provenance/carina-example-provenance": "urn:uuid:0b3c6f4e-6a0e-4b39-9a8e-3f1d2c000007",
}


def study_ref():
    return {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        "display": "Analysed chest X-ray study",
    }


def meta(profile, security=True):
    m = {"profile": [f"{SD}/{profile}"]}
    if security:
        m["security"] = [AIAST]
    return m


def examples():
    """Example instances with relative references ("Type/id")."""
    device = {
        "resourceType": "Device",
        "id": "carina-example-model",
        "meta": meta("CarinaModelDevice", security=False),
        "deviceName": [{"name": "carina-cxr-densenet121", "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [{"value": "0.1.0"}],
        "note": [{"text": f"Carina chest X-ray classifier: {DISCLAIMER}."}],
    }
    media = {
        "resourceType": "Media",
        "id": "carina-example-heatmap",
        "meta": meta("CarinaHeatmapMedia"),
        "status": "completed",
        "type": {"coding": [MEDIA_IMAGE]},
        "createdDateTime": T_RUN,
        "device": {"reference": "Device/carina-example-model"},
        "height": 2,
        "width": 2,
        "content": {"contentType": "image/png", "data": tiny_png(), "title": HEATMAP_TITLE},
        "note": [{"text": "Heatmap for the top finding: Pneumonia"}],
    }
    observations = []
    for code, display in LABELS:
        observations.append({
            "resourceType": "Observation",
            "id": f"carina-example-prob-{code}",
            "meta": meta("CarinaAIProbabilityObservation"),
            "status": "final",
            "category": [{"coding": [IMAGING]}],
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
            "effectiveDateTime": T_ACQ,
            "issued": T_RUN,
            "valueQuantity": {"value": PROBS[code], "unit": "probability", "system": UCUM, "code": "1"},
            "device": {"reference": "Device/carina-example-model"},
            "derivedFrom": [study_ref()],
        })
    top = max(LABELS, key=lambda cd: PROBS[cd[0]])
    report = {
        "resourceType": "DiagnosticReport",
        "id": "carina-example-report",
        "meta": meta("CarinaAIDiagnosticReport"),
        "status": "final",
        "category": [{"coding": [RAD]}],
        "code": {"coding": [CHEST_XR], "text": "Chest X-ray"},
        "effectiveDateTime": T_ACQ,
        "issued": T_RUN,
        "result": [{"reference": f"Observation/carina-example-prob-{c}", "display": d} for c, d in LABELS],
        "imagingStudy": [study_ref()],
        "media": [{"comment": HEATMAP_TITLE, "link": {"reference": "Media/carina-example-heatmap"}}],
        "conclusion": f"AI finding: {top[1]} (probability {PROBS[top[0]]:.2f}). {DISCLAIMER.capitalize()}.",
        "conclusionCode": [{"coding": [{"system": SNOMED, "code": top[0], "display": top[1]}]}],
    }
    prov = {
        "resourceType": "Provenance",
        "id": "carina-example-provenance",
        "meta": meta("CarinaAIProvenance", security=False),
        "target": [{"reference": "DiagnosticReport/carina-example-report"}],
        "recorded": T_RUN,
        "agent": [{
            "type": {"coding": [AUTHOR]},
            "who": {"reference": "Device/carina-example-model"},
        }],
        "entity": [{"role": "source", "what": study_ref()}],
    }
    risk = {
        "resourceType": "RiskAssessment",
        "id": "carina-example-risk",
        "meta": meta("CarinaRiskAssessment"),
        "status": "final",
        "method": {
            "coding": [{"system": MODELS, "code": RISK_MODEL, "display": f"{RISK_MODEL} {RISK_VERSION}"}],
            "text": f"{RISK_MODEL} {RISK_VERSION}",
        },
        "code": {"text": f"Risk of {RISK_OUTCOME[1]}"},
        "subject": {"reference": "Patient/example"},
        "occurrenceDateTime": T_RISK,
        "performer": {"reference": "Device/carina-example-model", "display": f"{RISK_MODEL} {RISK_VERSION}"},
        "basis": [{"reference": "Observation/carina-example-lab-ldh"},
                  {"reference": "Observation/carina-example-lab-hs-crp"}],
        "prediction": [{
            "outcome": {
                "coding": [{"system": SNOMED, "code": RISK_OUTCOME[0], "display": RISK_OUTCOME[1]}],
                "text": RISK_OUTCOME[1],
            },
            "probabilityDecimal": 0.4321,
            "qualitativeRisk": {
                "coding": [{"system": RISK_PROBABILITY, "code": "moderate", "display": "Moderate likelihood"}]
            },
        }],
        "note": [{"text": (
            "Inputs: age = 69 a (from birth date); ldh = 412 U/L (observed); lymphocytes_pct = 13.05 % "
            "(imputed); hs_crp = 61.2 mg/L (observed). Backend: local ONNX model "
            f"{RISK_MODEL} {RISK_VERSION} (IRIS IntegratedML is not configured). "
            "Demo model, not for clinical use."
        )}],
    }
    # Not in the Bundle (that one is the image-analysis result); its Provenance would be a second
    # Provenance example, which main() writes no file for, so there is none.
    return [report] + observations + [media, device, risk, prov]


def to_bundle(resources):
    def rewrite(v):
        if isinstance(v, dict):
            return {k: (IDS.get(x, x) if k == "reference" else rewrite(x)) for k, x in v.items()}
        if isinstance(v, list):
            return [rewrite(x) for x in v]
        return v

    entries = []
    for r in resources:
        full_url = IDS[f"{r['resourceType']}/{r['id']}"]
        r = {k: v for k, v in rewrite(r).items() if k != "id"}  # the urn:uuid fullUrl identifies it
        entries.append({"fullUrl": full_url, "resource": r})
    return {
        "resourceType": "Bundle",
        "id": "carina-example",
        "meta": {"security": [AIAST]},
        "type": "collection",
        "timestamp": T_RUN,
        "entry": entries,
    }


def write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(os.path.relpath(path, os.path.dirname(HERE)))


def main():
    for sd in profiles():
        write(os.path.join(HERE, f"StructureDefinition-{sd['id']}.json"), sd)
    write(os.path.join(HERE, "ValueSet-carina-finding-labels.json"), value_set())
    ex_dir = os.path.join(HERE, "examples")
    os.makedirs(ex_dir, exist_ok=True)
    resources = examples()
    seen = set()
    for r in resources:
        if r["resourceType"] in seen:  # one example file per profile (the first Observation)
            continue
        seen.add(r["resourceType"])
        write(os.path.join(ex_dir, f"{r['resourceType']}-carina-example.json"), r)
    bundled = [r for r in resources if f"{r['resourceType']}/{r['id']}" in IDS]  # not the RiskAssessment
    write(os.path.join(ex_dir, "Bundle-carina-example.json"), to_bundle(bundled))


if __name__ == "__main__":
    main()
