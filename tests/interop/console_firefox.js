// Headless Firefox (Debian's firefox-esr, driven over WebDriver BiDi by puppeteer-core) through
// every page of Spate's web console: each renders and goes live, a topic created from the form
// shows a published event in its live tail, and no console or page error happens. A screenshot of
// each page is saved with a `-firefox` suffix.
//
//   node console_firefox.js http://127.0.0.1:PORT SCREENSHOT_DIR
const fs = require("fs");
const path = require("path");
const puppeteer = require("puppeteer-core");

const base = process.argv[2];
const shots = process.argv[3];
const executablePath = process.env.SPATE_FIREFOX || "/usr/bin/firefox-esr";

function check(cond, message) {
  if (!cond) throw new Error(message);
}

(async () => {
  fs.mkdirSync(shots, { recursive: true });
  const browser = await puppeteer.launch({ browser: "firefox", executablePath, headless: true });
  const errors = [];
  const report = { browser: await browser.version() };
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 900 });
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(String(e)));
    const shot = (name) => page.screenshot({ path: path.join(shots, `${name}-firefox.png`), fullPage: true });
    const goto = async (hash, ready) => {
      await page.evaluate((h) => { location.hash = h; }, hash);
      await page.waitForFunction((h) => location.hash === h, {}, hash);
      if (ready) await page.waitForSelector(ready);
    };

    const started = Date.now();
    await page.goto(`${base}/`);
    await page.waitForFunction(() => document.getElementById("conn").textContent === "live", { timeout: 10000 });
    report.load_ms = Date.now() - started;
    await shot("overview");

    await goto("#/topics", "#new-topic");
    await page.type("#new-topic", "firefox");
    await page.click("button[type=submit]");
    await page.waitForSelector('a[href="#/topics/firefox"]');
    await shot("topics");

    await goto("#/topics/firefox", "#pub-type");
    await new Promise((r) => setTimeout(r, 300));
    await page.type("#pub-type", "order.created");
    await page.click("#pub-send");
    await page.waitForFunction(() => document.querySelectorAll("#tail-rows tr").length === 1, { timeout: 10000 });
    await shot("topic");

    for (const [hash, ready, name] of [
      ["#/streams", "#stream-topic", "streams"],
      ["#/subscriptions", "main table", "subscriptions"],
      ["#/projections", "main table", "projections"],
      ["#/detectors", "main table", "detectors"],
      ["#/builders", "#builder-kind", "builders"],
    ]) {
      await goto(hash, ready);
      await new Promise((r) => setTimeout(r, 300));
      await shot(name);
    }
    check(errors.length === 0, `console errors: ${errors.join(" | ")}`);
    report.ok = true;
    console.log(JSON.stringify(report));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
