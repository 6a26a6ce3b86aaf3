// The dashboard (/ui) and the API docs (/docs) in a real headless Chromium: what issue 12's
// browser test asks for. Run by tests/dashboard_browser.rs, which owns the orchestrator: this
// script prints `@stop` / `@start` and waits for `ok` on stdin when it needs the orchestrator
// stopped or back on the same port, `@browser-pid N` so a killed run leaves no browser behind,
// and `@done` when every check passed. Any failure exits non-zero with the reason.
//
// Environment: ORCHESTRATOR_URL (http://127.0.0.1:PORT), SCREENSHOT_DIR, TTL_SECONDS (the
// orchestrator's --ttl-seconds), CHROMIUM (default /usr/bin/chromium).

import { execFile } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium, launch } from './chromium.mjs';

const BASE = required('ORCHESTRATOR_URL').replace(/\/$/, '');
const SHOTS = required('SCREENSHOT_DIR');
const TTL_SECONDS = Number(required('TTL_SECONDS'));
/** The issue's requirement: a registration shows on the page within a second. */
const APPEARS_WITHIN_MS = 1000;

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/dashboard_browser.rs sets it)`);
  return value;
}

function log(line) {
  console.log(line);
}

// ---- The line protocol with tests/dashboard_browser.rs --------------------------------------

const replies = [];
const waiting = [];
createInterface({ input: process.stdin })
  .on('line', (line) => (waiting.length ? waiting.shift()(line) : replies.push(line)))
  .on('close', () => {
    // The Rust side is gone: nobody will answer, and nobody reads the verdict.
    while (waiting.length) waiting.shift()('stdin closed');
  });

/** Asks the Rust side to do `what` (`stop` or `start`) and waits until it is done. */
async function ask(what) {
  const reply = new Promise((resolve) => waiting.push(resolve));
  if (replies.length) waiting.shift()(replies.shift());
  log(`@${what}`);
  const answer = await reply;
  if (answer !== 'ok') throw new Error(`@${what}: the test answered ${JSON.stringify(answer)}`);
}

// ---- What the pages report: console errors, page errors, failed requests ---------------------

/** Everything unexpected, reported together at the end (or with the first failed check). */
const problems = [];
/** Network errors while the orchestrator was deliberately down: expected, listed for the log. */
const tolerated = [];
/** True from `@stop` until the page says it is live again after `@start`. */
let outage = false;
/** What a request to a stopped server ends with: refused, or cut off by the shutdown. */
const OUTAGE_ERRORS = ['CONNECTION_REFUSED', 'CONNECTION_RESET', 'CONNECTION_CLOSED', 'EMPTY_RESPONSE'];
const OUTAGE_REQUEST = new RegExp(`^net::ERR_(${OUTAGE_ERRORS.join('|')})$`);
const OUTAGE_CONSOLE = new RegExp(`^Failed to load resource: net::ERR_(${OUTAGE_ERRORS.join('|')})$`);

/** Starts collecting what `page` reports, under `label`; returns a function that stops it. */
function watch(page, label) {
  let on = true;
  const note = (what, url, expectedInOutage) => {
    if (!on) return;
    const line = `${label}: ${what}${url ? ` (${url})` : ''}`;
    const ours = !url || url.startsWith(`${BASE}/`);
    if (outage && ours && expectedInOutage) tolerated.push(line);
    else problems.push(line);
  };
  page.on('console', (m) => {
    if (m.type() === 'error') note(`console error: ${m.text()}`, m.location().url, OUTAGE_CONSOLE.test(m.text()));
  });
  page.on('pageerror', (e) => note(`uncaught: ${e.stack || e}`, '', false));
  page.on('requestfailed', (r) => {
    const error = r.failure()?.errorText ?? 'unknown';
    note(`request failed: ${r.method()} ${error}`, r.url(), OUTAGE_REQUEST.test(error));
  });
  page.on('response', (r) => {
    if (r.status() >= 400) note(`HTTP ${r.status()} for ${r.request().method()}`, r.url(), false);
  });
  // Closing a page aborts its open watch feed (net::ERR_ABORTED): that is the test, not the page.
  return () => {
    on = false;
  };
}

/** Fails now, with everything collected so far. */
function fail(message) {
  throw new Error(message);
}

// ---- The orchestrator, through the real curl binary ------------------------------------------

/** Runs curl with `args`; resolves with its output and the time it exited. */
function curl(args) {
  return new Promise((resolve, reject) => {
    let exitedAt = 0;
    const child = execFile('curl', ['-sS', '--fail-with-body', '--max-time', '5', ...args], (error, stdout, stderr) => {
      if (error) reject(new Error(`curl ${args.join(' ')}: ${error.message} ${stderr} ${stdout}`));
      else resolve({ stdout, exitedAt: exitedAt || Date.now() });
    });
    child.on('exit', () => {
      exitedAt = Date.now();
    });
  });
}

/** `curl -X POST …/services/$register`; resolves with the answer and curl's exit time. */
async function register(url, info) {
  const body = JSON.stringify({ url, info });
  const { stdout, exitedAt } = await curl([
    '-X', 'POST', `${BASE}/services/$register`, '-H', 'content-type: application/json', '-d', body,
  ]);
  const answer = JSON.parse(stdout);
  if (!answer.id) fail(`register ${url}: no id in ${stdout}`);
  return { ...answer, exitedAt };
}

async function deregister(id) {
  await curl(['-X', 'DELETE', `${BASE}/services/${id}`]);
}

/** Pings `ping_url` every TTL/3 until stopped, so the instance outlives the short TTL. */
function keepAlive(pingUrl) {
  const timer = setInterval(() => {
    fetch(pingUrl, { method: 'PUT' }).catch(() => {}); // down during the outage: expected
  }, (TTL_SECONDS * 1000) / 3);
  return () => clearInterval(timer);
}

// ---- Page helpers (the DOM contract: /work/notes/COMMON.md, docs/dashboard.md) ---------------

/** `[attr="value"]` for any value: JSON's string escapes are CSS's. */
const attr = (name, value) => `[${name}=${JSON.stringify(value)}]`;
const instance = (id) => `#services ${attr('data-instance', id)}`;
const service = (name) => `#services section.service${attr('data-name', name)}`;

async function connection(page, state, timeout) {
  await page.locator(`body${attr('data-connection', state)}`).waitFor({ state: 'attached', timeout })
    .catch(async () => fail(`body[data-connection] did not become ${state} within ${timeout} ms (it is ` +
      `${JSON.stringify(await page.locator('body').getAttribute('data-connection'))})`));
}

async function countIs(page, name, n) {
  const count = page.locator(`${service(name)} .count`);
  await page.waitForFunction(
    ([selector, want]) => document.querySelector(selector)?.textContent.trim() === want,
    [`${service(name)} .count`, String(n)],
    { timeout: 5000 },
  ).catch(async () => fail(`${service(name)} .count is not ${n}: ${JSON.stringify(await count.textContent().catch(() => null))}`));
}

/** Registers with curl and waits for the instance on `page`: returns the ms from curl's exit. */
async function registerAndSee(page, url, info) {
  const entry = await register(url, info);
  await page.locator(instance(entry.id)).waitFor({ state: 'visible', timeout: 10_000 })
    .catch(() => fail(`${url} (${entry.id}) did not appear in #services within 10 s`));
  const ms = Date.now() - entry.exitedAt;
  log(`registration of ${url} appeared in #services ${ms} ms after curl exited`);
  if (ms > APPEARS_WITHIN_MS) fail(`${url} took ${ms} ms to appear (more than ${APPEARS_WITHIN_MS} ms)`);
  return entry;
}

async function timelineShows(page, event, id, timeout) {
  await page.locator(`#timeline li${attr('data-event', event)}${attr('data-instance', id)}`)
    .waitFor({ state: 'attached', timeout })
    .catch(() => fail(`#timeline has no li[data-event=${event}][data-instance=${id}] within ${timeout} ms`));
}

async function hidden(page, selector, what) {
  await page.locator(selector).waitFor({ state: 'hidden', timeout: 3000 })
    .catch(() => fail(`${what}: ${selector} is still visible`));
}

async function visible(page, selector, what) {
  await page.locator(selector).waitFor({ state: 'visible', timeout: 3000 })
    .catch(() => fail(`${what}: ${selector} is not visible`));
}

async function shoot(page, name) {
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  log(`screenshot ${path}`);
}

/** A fresh page in its own context (`options`: viewport, colour scheme), collecting errors. */
async function open(browser, label, path, options) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  const stop = watch(page, label);
  await page.goto(`${BASE}${path}`);
  return {
    page,
    close: async () => {
      stop();
      await context.close();
    },
  };
}

// ---- The run ---------------------------------------------------------------------------------

async function dashboard(browser) {
  const desktop = await open(browser, 'desktop', '/ui', { viewport: { width: 1280, height: 800 } });
  const page = desktop.page;
  await connection(page, 'live', 10_000);

  const health = page.locator(`#orchestrator-health${attr('data-status', 'healthy')}`);
  await health.waitFor({ state: 'visible', timeout: 10_000 })
    .catch(async () => fail(`#orchestrator-health is not data-status=healthy: ${await page.locator('#orchestrator-health').evaluate((e) => e.outerHTML).catch((e) => e.message)}`));
  const healthText = await health.textContent();
  if (!/healthy/i.test(healthText)) fail(`#orchestrator-health says ${JSON.stringify(healthText)}, not healthy`);

  // Registrations appear within a second, grouped by display name with a count.
  const keepers = [];
  const billing1 = await registerAndSee(page, 'http://billing-1.internal:8080', { display_name: 'billing', version: '1.4.2' });
  keepers.push(keepAlive(billing1.ping_url));
  await countIs(page, 'billing', 1);
  const billing2 = await registerAndSee(page, 'http://billing-2.internal:8080', { display_name: 'billing', version: '1.5.0' });
  keepers.push(keepAlive(billing2.ping_url));
  await countIs(page, 'billing', 2);
  const search = await registerAndSee(page, 'http://search-1.internal:9200', { display_name: 'search', version: '2.3.0' });
  keepers.push(keepAlive(search.ping_url));
  await countIs(page, 'search', 1);
  await timelineShows(page, 'registered', billing1.id, 3000);

  // The headline figures come from /metrics: the registrations gauge reaches the 3 live ones.
  const registrations = '#figures [data-figure="registrations"]';
  await page.waitForFunction((selector) => document.querySelector(selector)?.textContent.trim() === '3', registrations, { timeout: 10_000 })
    .catch(async () => fail(`${registrations} does not show 3: ${JSON.stringify(await page.locator(registrations).textContent().catch(() => null))}`));

  // Each instance shows its URL, version, age, last ping, expiry countdown and health.
  const row = page.locator(instance(billing1.id));
  for (const part of ['.url', '.version', '.age', '.last-ping', '.expires', '.health[data-status="passing"]']) {
    if ((await row.locator(part).count()) !== 1) fail(`${instance(billing1.id)} has no single ${part}`);
  }
  const shownUrl = (await row.locator('.url').textContent()).trim();
  if (shownUrl !== 'http://billing-1.internal:8080') fail(`.url shows ${JSON.stringify(shownUrl)}`);
  const shownVersion = (await row.locator('.version').textContent()).trim();
  if (shownVersion !== '1.4.2') fail(`.version shows ${JSON.stringify(shownVersion)}`);
  // Pings make no watch event: the page's poll of the list moves the expiry (its title is the
  // time, redrawn only when the record changed).
  const expiresTitle = () => row.locator('.expires').getAttribute('title');
  const firstExpiry = await expiresTitle();
  await page.waitForFunction(
    ([selector, before]) => document.querySelector(selector)?.getAttribute('title') !== before,
    [`${instance(billing1.id)} .expires`, firstExpiry],
    { timeout: 10_000 },
  ).catch(async () => fail(`the pinged ${instance(billing1.id)} still expires at ${JSON.stringify(await expiresTitle())} after 10 s`));

  await shoot(page, 'desktop');
  const background = (p) => p.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const light = await background(page);
  for (const [label, options] of [
    ['phone', { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 }],
    ['dark', { viewport: { width: 1280, height: 800 }, colorScheme: 'dark' }],
  ]) {
    const other = await open(browser, label, '/ui', options);
    await connection(other.page, 'live', 10_000);
    await other.page.locator(instance(search.id)).waitFor({ state: 'visible' });
    if (label === 'phone') {
      // Readable on a phone: nothing wider than the screen, so no sideways scrolling.
      const width = await other.page.evaluate(() => document.documentElement.scrollWidth);
      if (width > 390) fail(`on a 390 px phone the page is ${width} px wide`);
    } else if ((await background(other.page)) === light) {
      fail(`dark mode: the background is the light one (${light})`);
    }
    await shoot(other.page, label);
    await other.close();
  }

  // The filter hides what does not match (name, URL, version, id) and shows it again.
  await page.fill('#filter', 'search');
  await hidden(page, service('billing'), 'filter "search"');
  await visible(page, instance(search.id), 'filter "search"');
  await page.fill('#filter', '1.5.0');
  await hidden(page, instance(billing1.id), 'filter "1.5.0"');
  await hidden(page, service('search'), 'filter "1.5.0"');
  await visible(page, instance(billing2.id), 'filter "1.5.0"');
  await page.fill('#filter', billing1.id);
  await hidden(page, instance(billing2.id), 'filter by id');
  await visible(page, instance(billing1.id), 'filter by id');
  await page.fill('#filter', '');
  for (const id of [billing1.id, billing2.id, search.id]) await visible(page, instance(id), 'empty filter');

  // A display name is text, never markup: nothing it carries is parsed or run.
  const evil = '<img id=xss-name src=x onerror=window.__xss=1>';
  const xss = await registerAndSee(page, 'http://xss.internal:1', { display_name: evil, version: '<b id=xss-version>1</b>' });
  // textContent, not innerText: a section below the fold is not laid out (content-visibility:
  // auto), and innerText of content the browser skipped is empty.
  const shown = await page.locator(service(evil)).textContent()
    .catch(() => fail(`no ${service(evil)}: the display name is not the section's data-name as given`));
  if (!shown.includes(evil)) fail(`the display name is not shown as text: ${JSON.stringify(shown)}`);
  const injected = await page.evaluate(() => ({
    elements: document.querySelectorAll('#xss-name, #xss-version, #services img, #timeline img').length,
    ran: window.__xss !== undefined,
  }));
  if (injected.elements || injected.ran) fail(`markup from a registration reached the DOM: ${JSON.stringify(injected)}`);

  // A deregistration and an expiry show in the timeline (newest first).
  await deregister(billing2.id);
  await timelineShows(page, 'deregistered', billing2.id, 3000);
  await countIs(page, 'billing', 1);
  const order = await page.evaluate((id) => [...document.querySelectorAll('#timeline li')]
    .filter((li) => li.dataset.instance === id).map((li) => li.dataset.event), billing2.id);
  if (order[0] !== 'deregistered' || !order.includes('registered')) fail(`#timeline is not newest first for ${billing2.id}: ${order}`);
  const batch = await registerAndSee(page, 'http://batch-1.internal:7000', { display_name: 'batch' });
  const expiry = (TTL_SECONDS + 3) * 1000;
  await timelineShows(page, 'expired', batch.id, expiry);
  await timelineShows(page, 'expired', xss.id, expiry);
  await page.locator(instance(batch.id)).waitFor({ state: 'detached', timeout: 3000 })
    .catch(() => fail(`expired ${batch.id} is still in #services`));

  // The orchestrator stops: the page says so; it comes back on the same port: the page is live.
  outage = true;
  await ask('stop');
  await connection(page, 'disconnected', 15_000);
  await visible(page, '#connection', 'disconnected');
  log(`#connection says ${JSON.stringify((await page.locator('#connection').innerText()).trim())}`);
  await shoot(page, 'disconnected');
  await ask('start');
  await connection(page, 'live', 20_000);
  outage = false;
  for (const stop of keepers) stop();
  const status = await page.locator('#connection').innerText();
  if (/disconnect/i.test(status)) fail(`#connection still says ${JSON.stringify(status)} while live`);
  await registerAndSee(page, 'http://billing-3.internal:8080', { display_name: 'billing', version: '1.5.0' });
  await desktop.close();
}

/** /docs: Swagger UI renders one operation block per (path, method) of /openapi.json. */
async function docs(browser) {
  const spec = await (await fetch(`${BASE}/openapi.json`)).json();
  const methods = new Set(['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace']);
  const operations = Object.values(spec.paths ?? {})
    .reduce((n, item) => n + Object.keys(item).filter((k) => methods.has(k)).length, 0);
  const docsPage = await open(browser, 'docs', '/docs', { viewport: { width: 1280, height: 800 } });
  const page = docsPage.page;
  await page.locator('.swagger-ui .info .title').waitFor({ state: 'visible' })
    .catch(() => fail('/docs: Swagger UI rendered no title'));
  await page.waitForFunction((n) => document.querySelectorAll('.opblock').length === n, operations, { timeout: 10_000 })
    .catch(async () => fail(`/docs shows ${await page.locator('.opblock').count()} operations, /openapi.json has ${operations}`));
  log(`/docs rendered ${operations} operations`);
  await shoot(page, 'docs');
  await docsPage.close();
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const server = await launch();
  try {
    const browser = await chromium.connect(server.wsEndpoint());
    try {
      await dashboard(browser);
      await docs(browser);
    } finally {
      await browser.close();
    }
  } finally {
    await server.close();
  }
}

let verdict = 0;
try {
  await main();
} catch (error) {
  log(`FAILED: ${error.stack || error}`);
  verdict = 1;
}
for (const line of tolerated) log(`expected while the orchestrator was down: ${line}`);
for (const line of problems) log(`UNEXPECTED: ${line}`);
if (problems.length) {
  log(`FAILED: ${problems.length} console error(s), page error(s) or failed request(s) (UNEXPECTED above)`);
  verdict = 1;
}
if (verdict === 0) log('@done');
process.exit(verdict);
