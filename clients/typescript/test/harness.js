// Starts a real chat-service process for the client tests: its own SQLite database and
// attachment folder in a temporary directory, port 0 (the address is read from the log), and
// tokens minted by the binary's own `token` command.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
export const repoRoot = resolve(here, "../../..");
const bin = process.env.CHAT_SERVICE_BIN ?? join(repoRoot, "target/debug/chat-service");
const SECRET = "client-test-secret-0123456789";

/**
 * Starts the server. `corsAllowedOrigins` goes to CORS_ALLOWED_ORIGINS.
 * Resolves to { url, token(user, ttlSeconds?), stop() }.
 */
export async function startServer({ corsAllowedOrigins = "" } = {}) {
  if (!existsSync(bin)) {
    throw new Error(`no server binary at ${bin}: run \`cargo build\` or set CHAT_SERVICE_BIN`);
  }
  const dir = mkdtempSync(join(tmpdir(), "chat-client-test-"));
  const env = {
    ...process.env,
    DATABASE_URL: `sqlite://${join(dir, "chat.db")}`,
    STORAGE_URL: `file://${join(dir, "attachments")}`,
    JWT_SECRET: SECRET,
    GRPC_ADDR: "127.0.0.1:0",
    CORS_ALLOWED_ORIGINS: corsAllowedOrigins,
    LOG_LEVEL: "info",
    // A heartbeat a second: a client that has seen one knows its stream is live.
    HEARTBEAT_SECONDS: "1",
    NO_COLOR: "1",
  };
  const child = spawn(bin, ["serve"], { env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  const url = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`server did not start:\n${log}`)), 30_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      // Strip colours, then find `addr=127.0.0.1:PORT` on the "listening" line.
      const m = log.replace(/\x1b\[[0-9;]*m/g, "").match(/listening.*?addr=(\S+)/);
      if (m) {
        clearTimeout(timer);
        ok(`http://${m[1]}`);
      }
    });
    child.on("exit", (code) => fail(new Error(`server exited (${code}):\n${log}`)));
  });
  return {
    url,
    /** A token for `user`; a negative ttl gives an expired one. */
    token(user, ttlSeconds = 3600) {
      return execFileSync(bin, ["token", "--sub", user, `--ttl=${ttlSeconds}`], {
        env: { ...env, JWT_SECRET: SECRET },
        encoding: "utf8",
      }).trim();
    },
    log: () => log,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Reads from an async iterator until `pred` has matched `n` items; fails after `ms`. */
export async function take(iter, n, pred = () => true, ms = 10_000) {
  const got = [];
  const deadline = Date.now() + ms;
  while (got.length < n) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`timed out with ${got.length} of ${n} items`);
    let timer;
    const next = await Promise.race([
      iter.next(),
      new Promise((_, fail) => {
        timer = setTimeout(() => fail(new Error(`timed out with ${got.length} of ${n} items`)), left);
      }),
    ]).finally(() => clearTimeout(timer));
    if (next.done) throw new Error(`stream ended with ${got.length} of ${n} items`);
    if (pred(next.value)) got.push(next.value);
  }
  return got;
}
