// Test-only browser driver for agentgate's approvals page: real Debian
// Chromium (/usr/bin/chromium), driven by npm playwright-core. Loopback only.
//
//   node browser.mjs approve PAGE_URL USER REQUEST_ID [SCREENSHOT.png]
//       Opens PAGE_URL, signs in through the provider's own login and consent
//       pages as USER (the test provider accepts any password), waits for
//       REQUEST_ID in the pending list, optionally saves a screenshot of the
//       page, then approves it with a reason. Prints one JSON line:
//       {"signed_in_as": ..., "notice": ..., "status": ..., "url": ...}
//
//   node browser.mjs token ISSUER CLIENT_ID REDIRECT_URI USER
//       Signs USER in to CLIENT_ID (authorization code + PKCE) and exchanges
//       the code itself (REDIRECT_URI gets the browser's request, with a state
//       it never issued). Prints {"id_token": ...} (a test account's
//       short-lived token, for the API tests).

import * as crypto from 'node:crypto';

import { chromium } from 'playwright-core';

const FLAGS = [
  '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function browser() {
  return chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: FLAGS });
}

// The provider's devInteractions pages: the login form, then consent. Each
// submit is followed to the next page before looking at it.
async function signIn(page, user) {
  await page.waitForSelector('input[name="login"]', { timeout: 15000 });
  await page.fill('input[name="login"]', user);
  await page.fill('input[name="password"]', 'any-password');
  await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
  for (let i = 0; i < 3 && page.url().includes('/interaction/'); i += 1) {
    const consent = await page.$('button[type="submit"]');
    if (!consent) break;
    // The last navigation may end at a redirect URI nobody answers: fine.
    await Promise.all([page.waitForNavigation().catch(() => {}), consent.click()]);
  }
}

async function approve(pageUrl, user, requestId, screenshot) {
  const b = await browser();
  try {
    const ctx = await b.newContext({ viewport: { width: 1400, height: 800 } });
    const page = await ctx.newPage();
    await page.goto(pageUrl);
    await Promise.all([page.waitForLoadState('load'), page.click('#sign-in')]);
    await signIn(page, user);
    await page.waitForSelector('#who', { timeout: 15000 });
    const row = `tr[data-id="${requestId}"]`;
    await page.waitForSelector(row, { timeout: 15000 });
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    await page.fill(`${row} form[action$="/approve"] input[name="reason"]`, 'change ticket reviewed');
    const [resp] = await Promise.all([
      page.waitForNavigation(),
      page.click(`${row} button.approve`),
    ]);
    const notice = await page.textContent('.notice');
    const who = await page.textContent('#who');
    process.stdout.write(`${JSON.stringify({
      signed_in_as: who, notice, status: resp ? resp.status() : null, url: page.url(),
    })}\n`);
  } finally {
    await b.close();
  }
}

async function token(issuer, clientId, redirectUri, user) {
  const verifier = crypto.randomBytes(32).toString('base64url');
  const challenge = crypto.createHash('sha256').update(verifier).digest('base64url');
  const state = crypto.randomBytes(16).toString('base64url');
  const nonce = crypto.randomBytes(16).toString('base64url');
  const disc = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
  const auth = new URL(disc.authorization_endpoint);
  Object.entries({
    client_id: clientId, response_type: 'code', redirect_uri: redirectUri,
    scope: 'openid profile email groups', state, nonce,
    code_challenge: challenge, code_challenge_method: 'S256',
  }).forEach(([k, v]) => auth.searchParams.set(k, v));
  const b = await browser();
  let code;
  try {
    const page = await b.newPage();
    // The provider answers with a redirect to REDIRECT_URI; redirects are not
    // routable in Chromium, so the code is read off the request itself (what
    // REDIRECT_URI then answers does not matter: it never sees this state).
    page.on('request', (req) => {
      if (!req.url().startsWith(redirectUri)) return;
      const u = new URL(req.url());
      if (u.searchParams.get('state') === state) code = u.searchParams.get('code');
    });
    await page.goto(auth.toString());
    await signIn(page, user);
    for (let i = 0; i < 100 && !code; i += 1) await new Promise((r) => { setTimeout(r, 100); });
  } finally {
    await b.close();
  }
  if (!code) throw new Error('no authorization code came back');
  const resp = await fetch(disc.token_endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code', code, redirect_uri: redirectUri,
      client_id: clientId, code_verifier: verifier,
    }),
  });
  const body = await resp.json();
  if (!body.id_token) throw new Error(`token endpoint: ${resp.status} ${body.error}`);
  process.stdout.write(`${JSON.stringify({ id_token: body.id_token })}\n`);
}

const [mode, ...args] = process.argv.slice(2);
try {
  if (mode === 'approve') await approve(...args);
  else if (mode === 'token') await token(...args);
  else throw new Error('usage: browser.mjs approve|token ...');
} catch (e) {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
}
