// The README's picture of the dashboard, taken from a running orchestrator (the demo):
//
//   cargo run -p servicekit-orchestrator --example demo &
//   node tests/browser/screenshot.mjs http://127.0.0.1:9000 docs/dashboard.png
//
// So that the timeline shows more than the first snapshot, it registers one more service,
// "Service C" (no server behind it, and not the one the demo's consumer calls), reports it
// `warning` on a ping, and deregisters it again after the picture, leaving the demo as it
// found it. tests/dashboard_browser.rs runs it
// against its own orchestrator, so the command keeps working.

import { chromium, launch } from './chromium.mjs';

const [base, out] = process.argv.slice(2).map((a, i) => (i === 0 ? a.replace(/\/$/, '') : a));
if (!base || !out) {
  console.error('usage: node tests/browser/screenshot.mjs <orchestrator URL> <out.png>');
  process.exit(2);
}

async function call(method, path, body) {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

const server = await launch();
const browser = await chromium.connect(server.wsEndpoint());
let extra;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  await page.goto(`${base}/ui`);
  await page.waitForSelector('body[data-connection=live]', { timeout: 10_000 });
  const registered = await call('POST', '/services/$register', {
    url: 'http://127.0.0.1:18080',
    info: { display_name: 'Service C', version: '0.3.0-rc.1' },
  });
  extra = registered.id;
  await call('PUT', `/services/${extra}/$ping`, { status: 'warning', output: 'slow: p99 840 ms' });
  await page.waitForSelector(`#timeline li[data-event=updated][data-instance="${extra}"]`, { timeout: 10_000 });
  // The figures and the ping times come from polls: let one of each land.
  await page.waitForTimeout(5_500);
  await page.screenshot({ path: out });
  console.log(`saved ${out}`);
} finally {
  if (extra) await call('DELETE', `/services/${extra}`).catch(() => {});
  await browser.close();
  await server.close();
}
