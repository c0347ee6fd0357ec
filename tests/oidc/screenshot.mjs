// Opens an agentgate evidence report (index.html) in headless Chromium through
// playwright-core, checks what an examiner would look at first, and saves a
// full-page PNG. Used by tests/tests/agent_evidence.rs and `cargo xtask demo`.
//
// Usage: node screenshot.mjs INDEX_HTML OUT_PNG
// Prints one JSON line: {"title", "heading", "banner", "attestation": [[identity, [answers]]],
// "sections": [...], "png_bytes"}. Exits 1 if the page has no heading or no
// attestation section. Chromium is Debian's (/usr/bin/chromium, or CHROMIUM);
// nothing is downloaded, and the page may load nothing from outside itself.

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

import { chromium } from 'playwright-core';

const [htmlPath, pngPath] = process.argv.slice(2);
if (!htmlPath || !pngPath) {
  process.stderr.write('usage: node screenshot.mjs INDEX_HTML OUT_PNG\n');
  process.exit(2);
}
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'agentgate-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1280, height: 1200 },
  timeout: 60_000,
});
let failed = false;
try {
  const page = await context.newPage();
  // The report is self-contained: any request other than the file itself is a defect.
  const outside = [];
  await page.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith('file:') || url.startsWith('data:')) return route.continue();
    outside.push(url);
    return route.abort();
  });
  await page.goto(pathToFileURL(path.resolve(htmlPath)).href, { waitUntil: 'load', timeout: 30_000 });
  const seen = await page.evaluate(() => {
    const text = (el) => (el ? el.textContent.trim() : null);
    return {
      title: document.title,
      heading: text(document.querySelector('h1')),
      banner: text(document.querySelector('.banner')),
      banner_bad: !!document.querySelector('.banner.bad'),
      sections: [...document.querySelectorAll('section[id]')].map((s) => s.id),
      attestation: [...document.querySelectorAll('#attestation h3')].map((h3) => {
        const table = h3.nextElementSibling;
        const answers = table ? [...table.querySelectorAll('tr')].slice(1).map((tr) => text(tr.children[2])) : [];
        return [text(h3), answers];
      }),
      svg: document.querySelectorAll('#timeline svg').length,
    };
  });
  await page.screenshot({ path: pngPath, fullPage: false });
  seen.png_bytes = fs.statSync(pngPath).size;
  seen.outside_requests = outside;
  process.stdout.write(`${JSON.stringify(seen)}\n`);
  failed = !seen.heading || !seen.sections.includes('attestation') || outside.length > 0;
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
