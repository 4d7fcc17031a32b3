// Takes the example out of README.md (its first ```ts block), type-checks it with tsc, runs it
// against a live server and checks what it prints, so the documented example cannot rot.
// esbuild strips the types; the package resolves itself by name (`@chat-service/client`)
// through its `exports`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { startServer } from "./harness.js";

const here = fileURLToPath(new URL(".", import.meta.url));
let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test("the README example runs and prints what it promises", async () => {
  const pkg = join(here, "..");
  const out = join(pkg, "test-results");
  mkdirSync(out, { recursive: true });
  const readme = readFileSync(join(pkg, "README.md"), "utf8");
  const code = readme.match(/```ts\n([\s\S]*?)```/)?.[1];
  assert.ok(code, "README.md has a ```ts block");
  writeFileSync(join(out, "quickstart.ts"), code);
  execFileSync(
    process.execPath,
    [
      join(pkg, "node_modules/typescript/bin/tsc"),
      ...["--noEmit", "--strict", "--target", "es2022", "--module", "nodenext"],
      ...["--moduleResolution", "nodenext", "--types", "node", join(out, "quickstart.ts")],
    ],
    { encoding: "utf8" },
  );
  await build({
    entryPoints: [join(out, "quickstart.ts")],
    outfile: join(out, "quickstart.mjs"),
    format: "esm",
    platform: "node",
    target: "node20",
    logLevel: "warning",
  });
  const stdout = execFileSync(process.execPath, [join(out, "quickstart.mjs")], {
    env: {
      ...process.env,
      CHAT_SERVER: server.url,
      ALICE_TOKEN: server.token("alice"),
      BOB_TOKEN: server.token("bob"),
    },
    encoding: "utf8",
    timeout: 30_000,
  });
  const lines = stdout.trim().split("\n");
  assert.deepEqual(lines, [
    "received: [ 'Hello Bob 👋', 'Lunch at noon?' ]",
    // Sequences: 1-2 members joined, 3-4 the live messages, 5 the one sent while away.
    "resumed: [ 'sent while you were away' ] cursor: 5n",
    "history: [ 'sent while you were away', 'Lunch at noon?', 'Hello Bob 👋' ]",
    "downloaded: bring snacks",
    "bad token: Unauthenticated",
  ]);
});
