// Draws one map page through the proxy in headless Chromium and prints
// what happened as one JSON line. Run by tests/it/maps.rs:
//
//   node run.mjs --page sdk|maplibre --proxy http://127.0.0.1:P \
//     --query 'services=…' --host localhost --netlog /tmp/x.json
//
// The page is bundled here (esbuild, offline, from the pinned npm packages)
// and served from http://<host>:<port>/ by a small static server; <host> is
// mapped to 127.0.0.1 inside Chromium, so a page origin outside the proxy's
// allowlist can be tried. WebGL runs on SwiftShader (no GPU needed). The
// NetLog (every request of the page and its workers, with the bytes read)
// goes to --netlog for the Rust side to check.

import { build } from "esbuild";
import { createServer } from "node:http";
import { readFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, normalize, extname, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

const here = dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1]]);
    return acc;
  }, []),
);
const page = args.page;
const host = args.host || "localhost";
const timeout = Number(args.timeout || 120000);

const out = await mkdtemp(join(tmpdir(), "aap-browser-"));
await build({
  entryPoints: [join(here, "pages", `${page}.js`)],
  bundle: true,
  format: "esm",
  splitting: true,
  minify: true,
  outdir: join(out, "dist"),
  logLevel: "warning",
});

// What the static server serves: the page, its bundle, and the libraries'
// own files (the SDK's assets with its workers, MapLibre's CSS).
const roots = [
  ["/dist/", join(out, "dist")],
  // MapLibre's ES module starts its worker from the file beside it.
  ["/dist/", join(here, "node_modules/maplibre-gl/dist")],
  ["/assets/", join(here, "node_modules/@arcgis/core/assets")],
  ["/maplibre/", join(here, "node_modules/maplibre-gl/dist")],
  ["/", join(here, "pages")],
];
const types = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png",
  ".svg": "image/svg+xml", ".woff2": "font/woff2",
};
const server = createServer(async (req, res) => {
  if (req.url === "/favicon.ico") {
    res.writeHead(204);
    res.end();
    return;
  }
  const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
  for (const [prefix, dir] of roots) {
    if (!path.startsWith(prefix)) continue;
    const file = normalize(join(dir, path.slice(prefix.length)));
    if (!file.startsWith(dir)) break;
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": types[extname(file)] || "application/octet-stream" });
      res.end(body);
      return;
    } catch {
      continue;
    }
  }
  res.writeHead(404);
  res.end();
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const port = server.address().port;

const browser = await puppeteer.launch({
  executablePath: args.chromium || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    `--host-resolver-rules=MAP ${host} 127.0.0.1`,
    `--log-net-log=${args.netlog}`,
    "--net-log-capture-mode=Everything",
  ],
});
const result = { console: [], failed: [], responses: [] };
try {
  const tab = await browser.newPage();
  await tab.setViewport({ width: 800, height: 600 });
  tab.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`));
  tab.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`));
  tab.on("response", (r) => result.responses.push(`${r.status()} ${r.url()}`));
  tab.on("requestfailed", (r) => result.failed.push(`${r.url()} ${r.failure()?.errorText}`));
  const url = `http://${host}:${port}/${page}.html?proxy=${encodeURIComponent(args.proxy)}&${args.query || ""}`;
  await tab.goto(url, { waitUntil: "load", timeout });
  await tab.waitForFunction(() => window.__result !== undefined, { timeout, polling: 200 });
  result.page = await tab.evaluate(() => window.__result);
} catch (e) {
  result.error = String(e && e.message || e);
  try {
    result.stage = await (await browser.pages())[1].evaluate(
      () => `${window.__stage} ${window.__debug ? window.__debug() : ""}`,
    );
  } catch {}
} finally {
  await browser.close();
  server.close();
  await rm(out, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
