// Signs an arbitrary JWT, for negative (and hand-made positive) access-token tests.
//
//   node tests/auth/mint.mjs --keys KEYS.json [--kid KID] [--alg ALG] [--typ TYP] [--no-kid]
//        [--exp-in SECONDS] [--hmac-secret STRING] --claims '{"iss":"...","aud":"...",...}'
//
// Prints the compact JWT (one line) on stdout. The claims are signed exactly as given (nothing is
// added) unless --exp-in is used, which sets iat = now and exp = now + SECONDS (expired: write it
// as --exp-in=-60, with "=", since node's parser takes "-60" for an option).
//   key     the key of KEYS.json whose kid is --kid, else the first key of the file
//   kid     header kid: --kid if given (even if no key has it: "unknown kid" tests), else the key's
//           kid; --no-kid leaves kid out of the header
//   alg     --alg, else the key's alg. Any JWS alg that fits the key works (e.g. RS256 / PS384 with
//           an RSA key). --alg none gives an unsecured JWT: header.payload. (empty signature).
//           --alg HS256/384/512 signs with --hmac-secret, by default with the selected key's PUBLIC
//           key as SPKI PEM text (the classic RS/HS algorithm-confusion attack).
//   typ     header typ, default at+jwt; --typ '' leaves it out
// The header is {"alg":..,"typ":"at+jwt","kid":..}; e.g. --alg none --no-kid --typ '' gives exactly
// {"alg":"none"}.
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { CompactSign, importJWK } from 'jose';

const { values: args } = parseArgs({
  options: {
    keys: { type: 'string' },
    kid: { type: 'string' },
    alg: { type: 'string' },
    typ: { type: 'string', default: 'at+jwt' },
    'no-kid': { type: 'boolean', default: false },
    'exp-in': { type: 'string' },
    'hmac-secret': { type: 'string' },
    claims: { type: 'string' },
  },
  strict: true,
});
if (!args.claims || (!args.keys && args.alg !== 'none')) {
  process.stderr.write('usage: node tests/auth/mint.mjs --keys KEYS.json [--kid KID] [--alg ALG] [--typ TYP] [--no-kid] [--exp-in S] [--hmac-secret S] --claims JSON\n');
  process.exit(2);
}

const claims = JSON.parse(args.claims);
if (args['exp-in'] !== undefined) {
  const now = Math.floor(Date.now() / 1000);
  claims.iat = now;
  claims.exp = now + Number(args['exp-in']);
}

let jwk;
if (args.keys) {
  const { keys } = JSON.parse(readFileSync(args.keys, 'utf8'));
  jwk = (args.kid !== undefined && keys.find((k) => k.kid === args.kid)) || keys[0];
}
const alg = args.alg ?? jwk?.alg;
if (!alg) throw new Error('no --alg and the key has no alg');

const header = { alg };
if (args.typ) header.typ = args.typ;
if (!args['no-kid']) {
  const kid = args.kid ?? jwk?.kid;
  if (kid !== undefined) header.kid = kid;
}

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
let token;
if (alg === 'none') {
  token = `${b64(header)}.${b64(claims)}.`;
} else {
  let key;
  if (alg.startsWith('HS')) {
    const secret = args['hmac-secret']
      ?? createPublicKey({ key: jwk, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
    key = Buffer.from(secret);
  } else {
    // Import without the JWK's own alg/use/kid, so the key can sign with any alg it supports.
    const { alg: _a, use: _u, kid: _k, key_ops: _o, ...material } = jwk;
    key = await importJWK(material, alg);
  }
  token = await new CompactSign(new TextEncoder().encode(JSON.stringify(claims)))
    .setProtectedHeader(header)
    .sign(key);
}
process.stdout.write(`${token}\n`);
