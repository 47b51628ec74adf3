// Generates the key material for Carina's OAuth2 / SMART-on-FHIR auth tests.
//
//   node tests/auth/keys.mjs OUTDIR
//
// Writes into OUTDIR (created if missing); private files are JWK Sets {"keys":[...]}:
//   issuer-a.json         authorization server signing key A: RSA-2048, use sig, alg RS384, kid "issuer-a"
//   issuer-b.json         authorization server signing key B (key rotation): RSA-2048, RS384, kid "issuer-b"
//   issuer-ec.json        P-256 key, alg ES256, kid "issuer-ec"
//   rogue.json            RSA-2048 RS384 key the issuer never publishes, with the SAME kid as
//                         issuer-a ("issuer-a"): tokens signed with it must fail signature checks
//   client.json           the SMART backend client's private key: RSA-2048, RS384, kid "carina-backend-client"
//   client-public.json    its public JWK Set (what the authorization server registers for the client)
//   issuer-a-public.json, issuer-b-public.json, issuer-ec-public.json
//                         public JWK Sets of the issuer keys (for a static-JWKS configuration)
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateKeyPair, exportJWK } from 'jose';

const outDir = process.argv[2];
if (!outDir) {
  process.stderr.write('usage: node tests/auth/keys.mjs OUTDIR\n');
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

async function makeKey(alg, kid) {
  const opts = { extractable: true };
  if (alg.startsWith('RS') || alg.startsWith('PS')) opts.modulusLength = 2048;
  const { publicKey, privateKey } = await generateKeyPair(alg, opts);
  const meta = { kid, use: 'sig', alg };
  return {
    priv: { ...(await exportJWK(privateKey)), ...meta },
    pub: { ...(await exportJWK(publicKey)), ...meta },
  };
}

function write(name, keys) {
  const file = join(outDir, name);
  const mode = keys.some((k) => k.d) ? 0o600 : 0o644;
  writeFileSync(file, `${JSON.stringify({ keys }, null, 2)}\n`, { mode });
  return file;
}

const a = await makeKey('RS384', 'issuer-a');
const b = await makeKey('RS384', 'issuer-b');
const ec = await makeKey('ES256', 'issuer-ec');
const rogue = await makeKey('RS384', a.priv.kid);
const client = await makeKey('RS384', 'carina-backend-client');

const written = [
  write('issuer-a.json', [a.priv]),
  write('issuer-b.json', [b.priv]),
  write('issuer-ec.json', [ec.priv]),
  write('rogue.json', [rogue.priv]),
  write('client.json', [client.priv]),
  write('client-public.json', [client.pub]),
  write('issuer-a-public.json', [a.pub]),
  write('issuer-b-public.json', [b.pub]),
  write('issuer-ec-public.json', [ec.pub]),
];
process.stderr.write(`keys.mjs: wrote ${written.join(' ')}\n`);
