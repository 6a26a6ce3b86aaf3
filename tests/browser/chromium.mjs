// Debian's Chromium (CHROMIUM, default /usr/bin/chromium) for the browser scripts: headless,
// as root in a container, asking nothing from the network. playwright-core never downloads a
// browser.

import { chromium } from 'playwright-core';

/** Starts Chromium and prints `@browser-pid N`: Chromium leads its own process group
 * (playwright starts it detached), which tests/dashboard_browser.rs kills too when it has to
 * kill the script. Resolves with the browser server; `chromium.connect` to it. */
export async function launch() {
  const server = await chromium.launchServer({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  console.log(`@browser-pid ${server.process().pid}`);
  return server;
}

export { chromium };
