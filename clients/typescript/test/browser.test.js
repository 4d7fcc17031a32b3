// A real browser: Debian's Chromium, driven by Playwright (playwright-core, no browser
// download), loads test/page from one origin (http://localhost:<page port>) and talks to the
// chat server on another (http://127.0.0.1:<grpc port>) over grpc-web through the generated
// client. Screenshots go to test-results/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { startServer } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const here = fileURLToPath(new URL(".", import.meta.url));
const results = join(here, "..", "test-results");

let dir, pageServer, pagePort, server, browser;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/test installs Debian's chromium)`);
  mkdirSync(results, { recursive: true });
  dir = mkdtempSync(join(tmpdir(), "chat-browser-test-"));
  // The page: index.html plus app.ts bundled with the client for the browser.
  await build({
    entryPoints: [join(here, "page/app.ts")],
    bundle: true,
    format: "esm",
    target: "chrome120",
    outfile: join(dir, "app.js"),
    logLevel: "warning",
  });
  writeFileSync(join(dir, "index.html"), readFileSync(join(here, "page/index.html")));
  pageServer = createServer((req, res) => {
    const name = new URL(req.url, "http://x").pathname === "/app.js" ? "app.js" : "index.html";
    res.setHeader("content-type", name.endsWith(".js") ? "text/javascript" : "text/html");
    res.end(readFileSync(join(dir, name)));
  });
  await new Promise((ok) => pageServer.listen(0, "127.0.0.1", ok));
  pagePort = pageServer.address().port;
  // Only the page's origin may call cross-origin.
  server = await startServer({ corsAllowedOrigins: `http://localhost:${pagePort}` });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
  pageServer?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function pageUrl(host, alice, bob = server.token("bob")) {
  const q = new URLSearchParams({ server: server.url, alice, bob, bobId: "bob" });
  return `http://${host}:${pagePort}/?${q}`;
}

async function open(url) {
  const page = await browser.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(url);
  return { page, logs };
}

test("send, live feed, upload from <input type=file> and download back, over grpc-web", async () => {
  const { page, logs } = await open(pageUrl("localhost", server.token("alice")));
  try {
    // "ready" appears at the feed's first heartbeat: the Subscribe stream is open and live, so
    // the message below can only arrive live, not by replay.
    await page.waitForSelector("#status:text('ready')", { timeout: 15_000 });
    assert.equal(await page.locator("#feed li").count(), 0);
    assert.equal(new URL(page.url()).hostname, "localhost");
    assert.equal(new URL(server.url).hostname, "127.0.0.1");

    await page.fill("#text", "Hello from Chromium 👋 שלום");
    await page.click("#send");
    const item = page.locator("#feed li", { hasText: "Hello from Chromium 👋 שלום" });
    await item.waitFor({ timeout: 10_000 });
    assert.match(await item.textContent(), /^#\d+ alice: Hello from Chromium 👋 שלום$/);

    // A file of three chunks (1 MiB, 1 MiB, the rest), picked in the file input.
    const data = randomBytes(2 * 1024 * 1024 + 777);
    const file = join(dir, "holiday photo.bin");
    writeFileSync(file, data);
    await page.setInputFiles("#file", file);
    await page.click("#upload");
    const result = page.locator("#upload-result[data-sha256]");
    await result.waitFor({ timeout: 30_000 });
    const sha256 = createHash("sha256").update(data).digest("hex");
    assert.equal(await result.getAttribute("data-size"), String(data.length));
    assert.equal(await result.getAttribute("data-sha256"), sha256);
    assert.equal(await result.getAttribute("data-server-sha256"), sha256);
    await page.locator("#feed li", { hasText: "file: holiday photo.bin" }).waitFor();
    assert.equal(await page.textContent("#error"), "");
    await page.screenshot({ path: join(results, "browser-grpc-web.png"), fullPage: true });
  } catch (e) {
    await page.screenshot({ path: join(results, "browser-grpc-web-failed.png"), fullPage: true });
    throw new Error(`${e.message}\npage log:\n${logs.join("\n")}\nserver log:\n${server.log()}`);
  } finally {
    await page.close();
  }
});

test("an expired token shows Unauthenticated in the page", async () => {
  const { page } = await open(pageUrl("localhost", server.token("alice", -120)));
  try {
    await page.waitForSelector("#error:not(:empty)", { timeout: 15_000 });
    assert.match(await page.textContent("#error"), /^Unauthenticated: /);
    await page.screenshot({ path: join(results, "browser-unauthenticated.png"), fullPage: true });
  } finally {
    await page.close();
  }
});

test("an origin not in CORS_ALLOWED_ORIGINS is refused by the browser", async () => {
  // Same page, other origin (127.0.0.1 instead of localhost): the browser blocks the response.
  const { page } = await open(pageUrl("127.0.0.1", server.token("alice")));
  try {
    await page.waitForSelector("#error:not(:empty)", { timeout: 15_000 });
    // fetch() fails as a network error: Connect reports Unknown with the browser's message.
    assert.equal(await page.textContent("#error"), "Unknown: Failed to fetch");
    assert.equal(await page.textContent("#status"), "failed");
  } finally {
    await page.close();
  }
});
