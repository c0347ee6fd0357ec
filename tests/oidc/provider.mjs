// Test-only OpenID provider for agentgate's identity tests. Loopback only.
//
// This runs the real `oidc-provider` package (see package.json for the pinned
// version) with the device authorization grant, client credentials, refresh
// tokens, revocation and introspection enabled. Nothing here is a mock of the
// protocol: the Rust tests talk OAuth/OIDC to it exactly as they would to a
// production IdP, and play the user's browser step by driving its real HTML
// pages (device code entry, confirmation, login form, consent).
//
// Install:  (cd tests/oidc && npm ci)      -- `cargo xtask setup` runs this.
// Run:      node tests/oidc/provider.mjs   -- prints one JSON line when ready:
//           {"issuer":"http://127.0.0.1:PORT","port":PORT,"kids":["..."]}
//
// Environment (all optional):
//   OIDC_PORT                  port on 127.0.0.1 to listen on (default 0: any free port)
//   OIDC_ISSUER                issuer to claim (default http://127.0.0.1:PORT). Setting it to
//                              another instance's issuer makes a provider that signs tokens
//                              that look like that instance's but with keys it never published
//                              (the "unknown signing key" test).
//   OIDC_KID_PREFIX            prefix of the key ids (default: random). Two instances with the
//                              same prefix publish the same kids with different keys (the
//                              "bad signature" test).
//   OIDC_ID_TOKEN_TTL          seconds (default 300)
//   OIDC_ACCESS_TOKEN_TTL      seconds (default 300), also client-credentials tokens
//   OIDC_REFRESH_TOKEN_TTL     seconds (default 3600)
//   OIDC_DEVICE_CODE_TTL       seconds (default 300)
//   OIDC_DEVICE_INTERVAL       polling interval announced in the device authorization
//                              response (default 1; RFC 8628's default of 5 makes tests slow)
//   OIDC_SLOW_DOWN_POLLS       answer this many device-code polls with `slow_down` (default 0)
//   OIDC_SVC_SECRET            client secret of `svc-reporting` and `svc-opaque`
//   OIDC_SVC_GROUPS            comma-separated groups of svc-reporting's tokens (default reporting)
//   OIDC_WEB_REDIRECT_URIS     comma-separated redirect URIs of `agentgate-web` (default
//                              http://127.0.0.1:15080/callback)
//
// Harness-only routes (not OIDC; documented as test instrumentation):
//   GET /__harness/stats       {"jwks_requests": n, "device_polls": n, "token_requests": n}
//
// Clients:
//   agentgate-cli      public (token_endpoint_auth_method none), device_code + refresh_token,
//                      ID tokens signed RS256
//   agentgate-cli-es   same, ID tokens signed ES256
//   svc-reporting      confidential (client_secret_basic), client_credentials; access tokens
//                      are RFC 9068 JWTs (ES256) for resource urn:agentgate with a groups claim
//   svc-opaque         confidential, client_credentials; opaque access tokens (introspection)
//   agentgate-web      public, authorization_code with PKCE (the daemon's approvals page),
//                      ID tokens signed RS256
//
// Accounts (the devInteractions login form accepts any password):
//   alice  groups [analysts]          bob  groups [approvers, analysts]
//   carol  no groups claim            dave   groups [approvers]
//   contractor@bank  groups [contractors] (the agent scenario)
//   (any other login name is refused)

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const env = (name, dflt) => (process.env[name] === undefined || process.env[name] === '' ? dflt : process.env[name]);
const seconds = (name, dflt) => {
  const v = Number(env(name, dflt));
  if (!Number.isInteger(v) || v < 0) throw new Error(`${name} must be a non-negative integer`);
  return v;
};

const port = seconds('OIDC_PORT', 0);
const kidPrefix = env('OIDC_KID_PREFIX', crypto.randomBytes(6).toString('hex'));
const ttl = {
  idToken: seconds('OIDC_ID_TOKEN_TTL', 300),
  accessToken: seconds('OIDC_ACCESS_TOKEN_TTL', 300),
  refreshToken: seconds('OIDC_REFRESH_TOKEN_TTL', 3600),
  deviceCode: seconds('OIDC_DEVICE_CODE_TTL', 300),
};
const deviceInterval = seconds('OIDC_DEVICE_INTERVAL', 1);
let slowDownPolls = seconds('OIDC_SLOW_DOWN_POLLS', 0);
const svcSecret = env('OIDC_SVC_SECRET', 'svc-reporting-test-secret-5f2c9a');
const webRedirectUris = env('OIDC_WEB_REDIRECT_URIS', 'http://127.0.0.1:15080/callback').split(',').map((u) => u.trim()).filter(Boolean);

const ACCOUNTS = {
  alice: { email: 'alice@example.test', name: 'Alice Analyst', groups: ['analysts'] },
  bob: { email: 'bob@example.test', name: 'Bob Approver', groups: ['approvers', 'analysts'] },
  carol: { email: 'carol@example.test', name: 'Carol NoGroups' },
  dave: { email: 'dave@example.test', name: 'Dave Approver', groups: ['approvers'] },
  'contractor@bank': { email: 'contractor@example.test', name: 'Agent Contractor', groups: ['contractors'] },
};
// OIDC_SVC_GROUPS (comma-separated) replaces svc-reporting's groups.
const SERVICE_GROUPS = {
  'svc-reporting': env('OIDC_SVC_GROUPS', 'reporting').split(',').map((g) => g.trim()).filter(Boolean),
};
const RESOURCE = 'urn:agentgate';

function signingKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return [
    { ...rsa, kid: `${kidPrefix}-rs256`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `${kidPrefix}-es256`, alg: 'ES256', use: 'sig' },
  ];
}

const stats = { jwks_requests: 0, device_polls: 0, token_requests: 0 };

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const actualPort = server.address().port;
const issuer = env('OIDC_ISSUER', `http://127.0.0.1:${actualPort}`);
const keys = signingKeys();

const deviceClient = (clientId, alg) => ({
  client_id: clientId,
  client_name: 'agentgate CLI',
  token_endpoint_auth_method: 'none',
  grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
  response_types: [],
  redirect_uris: [],
  id_token_signed_response_alg: alg,
});

const provider = new Provider(issuer, {
  clients: [
    deviceClient('agentgate-cli', 'RS256'),
    deviceClient('agentgate-cli-es', 'ES256'),
    {
      client_id: 'svc-reporting',
      client_secret: svcSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: 'reports:read',
    },
    {
      client_id: 'agentgate-web',
      client_name: 'agentgate approvals page',
      application_type: 'web',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: webRedirectUris,
      id_token_signed_response_alg: 'RS256',
    },
    {
      client_id: 'svc-opaque',
      client_secret: svcSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: 'reports:read',
    },
  ],
  jwks: { keys },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  // Put the scope's claims (groups, preferred_username, ...) in the ID token itself.
  conformIdTokenClaims: false,
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups', 'reports:read'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
    groups: ['groups'],
  },
  async findAccount(ctx, id) {
    const account = ACCOUNTS[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        const claims = {
          sub: id, preferred_username: id, name: account.name, email: account.email,
        };
        if (account.groups) claims.groups = account.groups;
        return claims;
      },
    };
  },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      async defaultResource(ctx, client) {
        return client.clientId === 'svc-reporting' ? RESOURCE : undefined;
      },
      async useGrantedResource() { return false; },
      async getResourceServerInfo(ctx, resourceIndicator) {
        if (resourceIndicator !== RESOURCE) throw new Error('unknown resource');
        return {
          scope: 'reports:read',
          audience: RESOURCE,
          accessTokenTTL: ttl.accessToken,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  async extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials' && SERVICE_GROUPS[token.clientId]) {
      return { groups: SERVICE_GROUPS[token.clientId] };
    }
    return undefined;
  },
  async issueRefreshToken(ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  ttl: {
    IdToken: ttl.idToken,
    AccessToken: ttl.accessToken,
    ClientCredentials: ttl.accessToken,
    RefreshToken: ttl.refreshToken,
    DeviceCode: ttl.deviceCode,
    Grant: ttl.refreshToken,
    Session: 3600,
    Interaction: 600,
  },
});

// Instrumentation and the two device-flow behaviours oidc-provider 8 leaves out:
// the `interval` member of the device authorization response, and `slow_down`.
const lastPoll = new Map();
provider.use(async (ctx, next) => {
  if (ctx.path === '/__harness/stats' && ctx.method === 'GET') {
    ctx.body = stats;
    return;
  }
  if (ctx.path === '/jwks') stats.jwks_requests += 1;
  if (ctx.path === '/token' && ctx.method === 'POST') {
    stats.token_requests += 1;
    const body = await readForm(ctx);
    if (body.get('grant_type') === 'urn:ietf:params:oauth:grant-type:device_code') {
      stats.device_polls += 1;
      const code = body.get('device_code') || '';
      const now = Date.now();
      const previous = lastPoll.get(code);
      lastPoll.set(code, now);
      const tooFast = previous !== undefined && now - previous < deviceInterval * 1000 - 100;
      if (slowDownPolls > 0 || tooFast) {
        if (slowDownPolls > 0) slowDownPolls -= 1;
        ctx.status = 400;
        ctx.body = { error: 'slow_down', error_description: 'polling too quickly' };
        return;
      }
    }
  }
  await next();
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    ctx.body = { ...ctx.body, interval: deviceInterval };
  }
});

// Reads an urlencoded body. oidc-provider then uses the already-read body
// (its documented fallback for upstream body parsers).
async function readForm(ctx) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > 56 * 1024) ctx.throw(413, 'request body too large');
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks).toString('utf8');
  ctx.request.body = raw;
  return new URLSearchParams(raw);
}

server.on('request', provider.callback());
process.stdout.write(`${JSON.stringify({ issuer, port: actualPort, kids: keys.map((k) => k.kid) })}\n`);

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
