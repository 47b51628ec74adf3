// A real OAuth 2.0 authorization server for Carina's auth tests, built on oidc-provider (a
// certified OpenID Provider implementation). It issues SMART Backend Services style
// client_credentials tokens: JWT access tokens (RFC 9068, typ at+jwt) for one resource server.
//
//   node tests/auth/issuer.mjs --port PORT --keys KEYS.json[,KEYS2.json] \
//        --client-jwks CLIENT_PUBLIC.json --audience AUD \
//        [--patient-client-patient PATIENT_ID] [--sign-kid KID] [--ttl SECONDS] [--die-with-stdin]
//
//   --port 0        picks a free port. Binds 127.0.0.1 only; the issuer is http://127.0.0.1:PORT.
//                   A fixed port may be reused right after the previous process exits (key rotation).
//   --keys          private JWK Sets (keys.mjs output). Every key of every file is published at
//                   jwks_uri; access tokens are signed with the first key of the first file (or
//                   --sign-kid), with that key's alg (RS384 for issuer-a/b, ES256 for issuer-ec).
//   --client-jwks   the public JWK Set registered for both clients (private_key_jwt, RS384).
//   --audience      the access tokens' aud (the Carina FHIR base URL, or any absolute URI; a value
//                   that is not an absolute URI still becomes aud, but clients cannot name it
//                   as a `resource` parameter then).
//   --patient-client-patient  the `patient` claim of carina-patient-app's tokens (none if absent).
//   --ttl           access token lifetime in seconds (default 300).
//   --die-with-stdin  exit when stdin reaches EOF (spawn with a piped stdin: the issuer then dies
//                   with its parent).
//
// When ready it prints exactly one JSON line on stdout:
//   {"issuer":"http://127.0.0.1:PORT","token_endpoint":"http://127.0.0.1:PORT/token","jwks_uri":"http://127.0.0.1:PORT/jwks"}
// Everything else goes to stderr. SIGTERM / SIGINT close the listener and exit 0.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

// oidc-provider prints NOTICEs with console.info: keep stdout for the one ready line.
console.log = console.error;
console.info = console.error;

// SMART v2 and v1 scopes the resource server accepts; requested scopes outside this list are
// silently dropped from the token (oidc-provider filters them by the resource server's scope).
const SCOPES = [
  'system/*.cruds', 'system/*.rs', 'system/*.read', 'system/*.write', 'system/*.*',
  'system/Observation.rs', 'system/Observation.r', 'system/Observation.c', 'system/Observation.cruds',
  'system/Observation.read', 'system/Observation.write',
  'system/Patient.rs', 'system/Patient.r', 'system/Patient.cruds',
  'system/ImagingStudy.cruds', 'system/ImagingStudy.rs', 'system/ImagingStudy.c',
  'system/DiagnosticReport.rs', 'system/DiagnosticReport.c',
  'system/RiskAssessment.c', 'system/RiskAssessment.rs',
  'patient/*.rs', 'patient/*.cruds', 'patient/*.read',
  'patient/Observation.rs', 'patient/Patient.r', 'patient/Patient.rs',
  'patient/ImagingStudy.cruds', 'patient/RiskAssessment.c',
  'user/*.cruds', 'user/*.rs',
];

const BACKEND_CLIENT = 'carina-backend';
const PATIENT_CLIENT = 'carina-patient-app';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    keys: { type: 'string' },
    'client-jwks': { type: 'string' },
    audience: { type: 'string' },
    'patient-client-patient': { type: 'string' },
    'sign-kid': { type: 'string' },
    ttl: { type: 'string', default: '300' },
    'die-with-stdin': { type: 'boolean', default: false },
  },
  strict: true,
});
for (const required of ['keys', 'client-jwks', 'audience']) {
  if (!args[required]) {
    process.stderr.write(`issuer.mjs: --${required} is required\n`);
    process.exit(2);
  }
}

const readJwks = (file) => {
  const jwks = JSON.parse(readFileSync(file, 'utf8'));
  if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) throw new Error(`${file}: no keys`);
  return jwks.keys;
};
const signingKeys = args.keys.split(',').filter(Boolean).flatMap(readJwks);
const clientJwks = { keys: readJwks(args['client-jwks']) };
const signKey = args['sign-kid']
  ? signingKeys.find((k) => k.kid === args['sign-kid'])
  : signingKeys[0];
if (!signKey) throw new Error(`no key with kid ${args['sign-kid']} in --keys`);
const signAlg = signKey.alg || (signKey.kty === 'EC' ? 'ES256' : 'RS384');
const audience = args.audience;
// The resource indicator naming Carina (RFC 8707 needs an absolute URI); aud is `audience` anyway.
const resourceId = URL.parse(audience) ? audience : 'urn:carina-test:resource-server';
const ttl = Number(args.ttl);
const patientId = args['patient-client-patient'];

const server = http.createServer();
try {
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(args.port), '127.0.0.1', resolve);
  });
} catch (err) {
  process.stderr.write(`issuer.mjs: cannot listen on 127.0.0.1:${args.port}: ${err.code ?? err.message}\n`);
  process.exit(1);
}
const issuer = `http://127.0.0.1:${server.address().port}`;

// Imported after the console is rerouted, so nothing it prints reaches stdout.
const { default: Provider, errors } = await import('oidc-provider');

const smartClient = (clientId) => ({
  client_id: clientId,
  token_endpoint_auth_method: 'private_key_jwt',
  token_endpoint_auth_signing_alg: 'RS384',
  jwks: clientJwks,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
});

const provider = new Provider(issuer, {
  clients: [smartClient(BACKEND_CLIENT), smartClient(PATIENT_CLIENT)],
  jwks: { keys: signingKeys },
  routes: { token: '/token', jwks: '/jwks' },
  cookies: { keys: ['carina-auth-tests-only'] },
  // Listed for discovery (scopes_supported); what a token may carry is the resource server's scope.
  scopes: ['openid', 'offline_access', ...SCOPES],
  ttl: { ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? ttl },
  // oidc-provider's defaults leave RS384 out; SMART Backend Services asks for RS384 / ES384.
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384'],
    idTokenSigningAlgValues: ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'ES256', 'ES384'],
  },
  clientDefaults: { id_token_signed_response_alg: signAlg },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => resourceId,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (resourceIndicator !== resourceId && resourceIndicator !== audience) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: SCOPES.join(' '),
          audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: signAlg, kid: signKey.kid } },
        };
      },
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    if (token.clientId === PATIENT_CLIENT && patientId) return { patient: patientId };
    return undefined;
  },
});

provider.on('grant.success', (ctx) => {
  const t = ctx.oidc.entities.ClientCredentials;
  console.error(`issuer: token for ${ctx.oidc.client?.clientId} scope="${t?.scope ?? ''}"`);
});
provider.on('grant.error', (ctx, err) => {
  console.error(`issuer: token error for ${ctx.oidc.client?.clientId ?? '?'}: ${err.error} ${err.error_description ?? ''} ${err.error_detail ?? err.cause?.message ?? ''}`);
});
provider.on('server_error', (_ctx, err) => console.error('issuer: server error', err));

server.on('request', provider.callback());

const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args['die-with-stdin']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({
  issuer,
  token_endpoint: `${issuer}/token`,
  jwks_uri: `${issuer}/jwks`,
})}\n`);
console.error(`issuer: ready at ${issuer} (signing ${signAlg} kid ${signKey.kid}, audience ${audience}, ${signingKeys.length} published key(s))`);
