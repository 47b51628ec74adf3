#!/usr/bin/env python3
"""Validates FHIR R4 JSON files with the fhir.resources (6.4.0, FHIR 4.0.1, pydantic 1) models.

    .venv/bin/python tests/fhir/validate_fhir_resources.py FILE...

Each FILE holds one resource or a Bundle. Checks per file:
  1. fhir.resources parses it: get_fhir_model_class(resourceType).parse_obj(doc). That checks
     element names (no unknown properties), cardinality, required elements (primitives included,
     e.g. Observation.status), primitive formats (dateTime, id, uri, ...), choice types [x],
     and the structure of every embedded resource (Bundle.entry.resource, contained, ...).
  2. For a Bundle, each entry.resource is parsed on its own too (recursively for nested Bundles).
  3. Codes with a required binding (e.g. Observation.status) are checked against the code lists of
     the official R4 JSON schema (r4_required_bindings.json, beside this file): fhir.resources
     does not check those itself.
  4. Reference target types (e.g. DiagnosticReport.result -> Observation only), where the type
     can be told: "Type/id" (relative or absolute), "#id" (contained), or a urn:uuid: / URL that
     is the fullUrl of an entry of the same Bundle.
Output: one line per problem, `FILE: JSONPATH: message`, then a final summary line
`fhir.resources: N files ok` (or `fhir.resources: N files ok, M failed`).
Exit status: 0 when every file passed, 1 when any failed, 2 on a usage error.
"""
import json
import os
import re
import sys

try:
    import pydantic
    from fhir.resources import __fhir_version__, get_fhir_model_class
    from fhir.resources.backboneelement import BackboneElement
    from fhir.resources.core.fhirabstractmodel import FHIRAbstractModel
    from fhir.resources.resource import Resource
except ImportError as e:  # pragma: no cover
    sys.stderr.write(
        f"validate_fhir_resources: {e}\n"
        "  install with: bash scripts/setup.sh --test  (then use .venv/bin/python)\n"
    )
    sys.exit(2)

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "r4_required_bindings.json")) as _f:
    _BINDINGS = json.load(_f)
ENUMS = _BINDINGS["enums"]
BACKBONES = _BINDINGS["backbones"]
# schema definition names of resources and data types (backbone elements have a "_")
ROOT_DEFS = {k.split(".", 1)[0] for k in list(ENUMS) + list(BACKBONES)}
ROOT_DEFS |= {v.split("_", 1)[0] for v in BACKBONES.values()}

REF_TYPE_RE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def jpath(base, loc):
    p = base
    for s in loc:
        if s == "__root__":
            continue
        if isinstance(s, int):
            p += f"[{s}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(s)):
            p += f".{s}"
        else:
            p += f"[{json.dumps(s)}]"
    return p


def short(v):
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def parse(res, base):
    """Parses one resource with fhir.resources; returns (model or None, [(path, message)])."""
    if not isinstance(res, dict):
        return None, [(base, f"should be a FHIR resource (JSON object), got {short(res)}")]
    rt = res.get("resourceType")
    if not isinstance(rt, str):
        return None, [(base, "missing required property 'resourceType'")]
    try:
        klass = get_fhir_model_class(rt)
    except KeyError:
        klass = None
    if klass is None or not issubclass(klass, Resource):
        return None, [(f"{base}.resourceType", f"unknown FHIR R4 resourceType {short(rt)}")]
    try:
        return klass.parse_obj(res), []
    except pydantic.ValidationError as e:
        return None, [
            (jpath(base, err["loc"]), "missing required property" if err["type"] == "value_error.missing" else err["msg"])
            for err in e.errors()
        ]
    except Exception as e:  # fhir.resources raises a few plain errors (e.g. wrong resourceType)
        return None, [(base, f"{type(e).__name__}: {e}")]


def ref_target_type(ref, contained, full_urls):
    if ref.startswith("#"):
        return contained.get(ref[1:])
    if ref in full_urls:
        return full_urls[ref]
    m = REF_TYPE_RE.search(ref)
    return m.group(1) if m else None


def check_model(model, defname, base, ctx, out):
    """Walks a parsed model: required-binding codes and reference target types."""
    for name, field in model.__fields__.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        alias = field.alias
        key = f"{defname}.{alias}"
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            p = f"{base}.{alias}" + (f"[{i}]" if isinstance(value, list) else "")
            if key in ENUMS and isinstance(v, str) and v not in ENUMS[key]:
                allowed = ENUMS[key]
                shown = ", ".join(allowed[:12]) + (", ..." if len(allowed) > 12 else "")
                out.append((p, f"code {short(v)} is not allowed here (allowed: {shown})"))
            if not isinstance(v, FHIRAbstractModel):
                continue
            allowed_refs = field.field_info.extra.get("enum_reference_types")
            if allowed_refs and getattr(v, "reference", None) and "Resource" not in allowed_refs \
                    and "+" not in allowed_refs:
                t = ref_target_type(v.reference, ctx["contained"], ctx["full_urls"])
                if t is not None and t not in allowed_refs:
                    out.append((f"{p}.reference",
                                f"reference to a {t} is not allowed here (allowed: {', '.join(allowed_refs)})"))
            if isinstance(v, Resource):
                check_resource(v, p, ctx["full_urls"], out)
                continue
            rt = getattr(v, "resource_type", None)
            if key in BACKBONES and not (rt in ROOT_DEFS and not isinstance(v, BackboneElement)):
                child = BACKBONES[key]
            else:
                child = rt
            check_model(v, child, p, ctx, out)


def check_resource(model, base, full_urls, out):
    contained = {}
    for c in getattr(model, "contained", None) or []:
        if getattr(c, "id", None):
            contained[c.id] = c.resource_type
    if model.resource_type == "Bundle":
        full_urls = dict(full_urls)
        for e in model.entry or []:
            if e.fullUrl and e.resource is not None:
                full_urls[e.fullUrl] = e.resource.resource_type
    check_model(model, model.resource_type, base, {"contained": contained, "full_urls": full_urls}, out)


def validate_resource(res, base):
    model, problems = parse(res, base)
    if model is not None:
        check_resource(model, base, {}, problems)
    # each Bundle entry on its own too
    if isinstance(res, dict) and res.get("resourceType") == "Bundle" and isinstance(res.get("entry"), list):
        for i, e in enumerate(res["entry"]):
            if isinstance(e, dict) and "resource" in e:
                p = f"{base}.entry[{i}].resource"
                _, sub = parse(e["resource"], p)
                problems.extend(sub)
                if isinstance(e["resource"], dict) and e["resource"].get("resourceType") == "Bundle":
                    problems.extend(validate_resource(e["resource"], p))
    seen, out = set(), []
    for pm in problems:
        if pm not in seen:
            seen.add(pm)
            out.append(pm)
    return out


def main(argv):
    files = argv[1:]
    if not files or "-h" in files or "--help" in files:
        sys.stderr.write("usage: validate_fhir_resources.py FILE...\n")
        return 2 if not files else 0
    assert __fhir_version__ == "4.0.1", f"fhir.resources is FHIR {__fhir_version__}, not R4 4.0.1"
    ok = failed = 0
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as e:
            print(f"{f}: $: cannot read/parse JSON: {e}")
            failed += 1
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            problems = [("$", "not a FHIR resource: expected a JSON object with a resourceType")]
        else:
            problems = validate_resource(doc, "$")
        if problems:
            failed += 1
            for p, m in problems:
                print(f"{f}: {p}: {m}")
        else:
            ok += 1
    print(f"fhir.resources: {ok} files ok" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
