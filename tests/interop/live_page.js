// Headless Chromium (Debian's, driven by playwright-core) against Spate's example page
// /examples/live: it shows a topic's events live and, after a reload, continues right after the
// last event it showed. Fails on any console error or page error.
//
//   node live_page.js http://127.0.0.1:PORT
const { chromium } = require("playwright-core");

const base = process.argv[2];
const executablePath = process.env.SPATE_CHROMIUM || "/usr/bin/chromium";

async function api(method, path, body, contentType) {
  const res = await fetch(base + path, {
    method,
    headers: body === undefined ? {} : { "content-type": contentType || "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status >= 300) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res.json();
}

async function publish(topic, from, n) {
  const events = [];
  for (let i = from; i < from + n; i++) {
    events.push({ specversion: "1.0", id: `e${i}`, source: "/browser-test", type: "demo.n", data: { n: i } });
  }
  await api("POST", `/v1/topics/${topic}/events`, events, "application/cloudevents-batch+json");
}

async function rows(page) {
  return page.$$eval("#events tr", (trs) => trs.map((tr) => tr.children[3].textContent).sort());
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

(async () => {
  const topic = `live-${Date.now()}`;
  await api("POST", "/v1/topics", { name: topic, partitions: 2 });
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  const errors = [];
  try {
    const page = await browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(String(e)));
    const started = Date.now();
    await page.goto(`${base}/examples/live?topic=${topic}`);
    await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Connected"));
    const loadMs = Date.now() - started;

    await publish(topic, 0, 5);
    await page.waitForFunction(() => document.getElementById("count").textContent === "5", null, { timeout: 10000 });
    const first = await rows(page);
    check(JSON.stringify(first) === JSON.stringify(["e0", "e1", "e2", "e3", "e4"]), `first rows: ${first}`);

    // Reload: the page resumes after its last event, so only new events appear.
    await page.reload();
    await page.waitForFunction(() => document.getElementById("status").textContent.includes("resumed after"));
    await publish(topic, 5, 3);
    await page.waitForFunction(() => document.getElementById("count").textContent === "3", null, { timeout: 10000 });
    await page.waitForTimeout(500);
    const after = await rows(page);
    check(JSON.stringify(after) === JSON.stringify(["e5", "e6", "e7"]), `rows after reload: ${after}`);

    // A filter from the query string applies.
    await page.goto(`${base}/examples/live?topic=${topic}&filter=${encodeURIComponent("data.n >= 6")}`);
    await page.waitForFunction(() => document.getElementById("count").textContent === "2", null, { timeout: 10000 });
    const filtered = await rows(page);
    check(JSON.stringify(filtered) === JSON.stringify(["e6", "e7"]), `filtered rows: ${filtered}`);

    check(errors.length === 0, `console errors: ${errors.join(" | ")}`);
    console.log(JSON.stringify({ ok: true, load_ms: loadMs, first, after, filtered }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
