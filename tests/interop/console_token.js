// Headless Chromium against a Spate server started with --auth-tokens-file: the console opened
// as /#token=<token> lists topics and goes live (its WebSocket carries the token), and takes the
// token out of the address bar; opened without one it asks for it; the example page follows a
// topic with ?token=. Fails on any console or page error other than the expected 401.
//
//   node console_token.js http://127.0.0.1:PORT TOKEN
const { chromium } = require("playwright-core");

const [base, token] = process.argv.slice(2);
const executablePath = process.env.SPATE_CHROMIUM || "/usr/bin/chromium";

async function api(method, path, body, contentType) {
  const headers = { authorization: `Bearer ${token}` };
  if (body !== undefined) headers["content-type"] = contentType || "application/json";
  const res = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status >= 300) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res.json();
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

(async () => {
  const denied = await fetch(`${base}/v1/topics`);
  check(denied.status === 401, `without a token: ${denied.status}`);
  await api("POST", "/v1/topics", { name: "guarded", partitions: 1 });
  await api("POST", "/v1/topics/guarded/events",
    [{ specversion: "1.0", id: "g1", source: "/t", type: "guarded.made", data: { n: 1 } }],
    "application/cloudevents-batch+json");
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  const errors = [];
  const watch = (page, refusedFirst) => {
    page.on("console", (m) => {
      // Without a token, the requests made before it was asked for are refused, as they should be.
      const refused = /401|Authentication failed/.test(m.text());
      if (m.type() === "error" && !(refusedFirst && refused)) errors.push(m.text());
    });
    page.on("pageerror", (e) => errors.push(String(e)));
  };
  try {
    // The token in the address: used, then taken out of it.
    let page = await browser.newPage();
    watch(page);
    await page.goto(`${base}/#token=${encodeURIComponent(token)}`);
    await page.waitForFunction(() => document.getElementById("conn").textContent === "live");
    check(!page.url().includes(token), `the token stayed in the address: ${page.url()}`);
    await page.evaluate(() => { location.hash = "#/topics"; });
    await page.waitForSelector('a[href="#/topics/guarded"]');
    await page.close();

    // No token: the console asks for one, then works.
    page = await browser.newPage();
    watch(page, true);
    let asked = 0;
    page.on("dialog", (d) => { asked += 1; d.accept(token); });
    await page.goto(`${base}/#/topics`);
    await page.waitForSelector('a[href="#/topics/guarded"]');
    check(asked >= 1, "the console did not ask for a token");
    // Its WebSocket, refused before, reconnects with the token.
    await page.waitForFunction(() => document.getElementById("conn").textContent === "live", null, { timeout: 10000 });
    await page.close();

    // The example page with ?token=.
    page = await browser.newPage();
    watch(page);
    await page.goto(`${base}/examples/live?topic=guarded&token=${encodeURIComponent(token)}`);
    await page.waitForFunction(() => document.getElementById("count").textContent === "1", null, { timeout: 10000 });
    await page.close();
    check(errors.length === 0, `console errors: ${errors.join(" | ")}`);
    console.log(JSON.stringify({ ok: true, asked }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.log(JSON.stringify({ ok: false, error: String(e), errors: [] }));
  process.exit(1);
});
