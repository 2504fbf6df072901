// Test helpers: a live Sieve server (the repo's Python server, `sieve serve`, on a free port with a
// temporary data directory), fake grpc-js servers, a self-signed certificate.
import { type ChildProcess, execFile, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { Metadata, type status as Status } from "@grpc/grpc-js";

// The repository (its Python server, models and examples); SIEVE_ROOT when this package is tested from a copy.
export const ROOT = process.env.SIEVE_ROOT ?? resolve(__dirname, "..", "..", "..", "..");
export const NOTES = join(ROOT, "examples", "data", "notes.jsonl");
const PYTHON = process.env.SIEVE_PYTHON ?? join(ROOT, ".venv", "bin", "python");

export async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

export interface LiveServer {
  address: string;
  stop(): Promise<void>;
  /** SIGKILL, as a crash: no graceful shutdown. */
  kill(): Promise<void>;
  log(): string;
}

/** `python -m sieve_cli.main serve` on a free port, waited for until health says SERVING. */
export async function startServer(): Promise<LiveServer> {
  if (!existsSync(PYTHON)) throw new Error(`${PYTHON} is missing: run \`make install\` in ${ROOT}`);
  const address = `127.0.0.1:${await freePort()}`;
  const dataDir = mkdtempSync(join(tmpdir(), "sieve-node-test-"));
  const env: NodeJS.ProcessEnv = Object.fromEntries(
    Object.entries(process.env).filter(([key]) => !key.startsWith("SIEVE_")),
  );
  Object.assign(env, {
    SIEVE_GRPC_ADDRESS: address,
    SIEVE_DATA_DIR: dataDir,
    SIEVE_MODELS_DIR: join(ROOT, "models"),
    SIEVE_LOG_LEVEL: "WARNING",
    SIEVE_METRICS_ADDRESS: "",
  });
  let output = "";
  const proc: ChildProcess = spawn(PYTHON, ["-m", "sieve_cli.main", "serve"], { cwd: ROOT, env });
  proc.stdout?.on("data", (d) => (output += d));
  proc.stderr?.on("data", (d) => (output += d));
  const signal = async (name: NodeJS.Signals) => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise((done) => proc.once("exit", done));
      proc.kill(name);
      await exited;
    }
  };
  const stop = async () => {
    await signal("SIGTERM");
    rmSync(dataDir, { recursive: true, force: true });
  };
  try {
    await promisify(execFile)(PYTHON, ["-m", "sieve_cli.main", "health", "--address", address, "--timeout", "120"], {
      cwd: ROOT,
      env,
    });
  } catch (err) {
    await stop();
    throw new Error(`the server did not start: ${err}\n${output}`);
  }
  return { address, stop, kill: () => signal("SIGKILL"), log: () => output };
}

/** A self-signed certificate for 127.0.0.1 / localhost (openssl). */
export function selfSigned(): { key: Buffer; cert: Buffer; certPath: string } {
  const dir = mkdtempSync(join(tmpdir(), "sieve-node-tls-"));
  const key = join(dir, "key.pem");
  const cert = join(dir, "cert.pem");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
  ], { stdio: "ignore" });
  return { key: readFileSync(key), cert: readFileSync(cert), certPath: cert };
}

/** Trailers of a refusal with google.rpc.RetryInfo, as a server sends them. */
export function retryInfoTrailer(code: Status, message: string, delayMs: number): Metadata {
  const seconds = Math.floor(delayMs / 1000);
  const nanos = Math.round((delayMs - seconds * 1000) * 1e6);
  const duration = new BinaryWriter().uint32((1 << 3) | 0).int64(seconds).uint32((2 << 3) | 0).int32(nanos).finish();
  const retryInfo = new BinaryWriter().uint32((1 << 3) | 2).bytes(duration).finish();
  const any = new BinaryWriter()
    .uint32((1 << 3) | 2)
    .string("type.googleapis.com/google.rpc.RetryInfo")
    .uint32((2 << 3) | 2)
    .bytes(retryInfo)
    .finish();
  const status = new BinaryWriter()
    .uint32((1 << 3) | 0)
    .int32(code)
    .uint32((2 << 3) | 2)
    .string(message)
    .uint32((3 << 3) | 2)
    .bytes(any)
    .finish();
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(status));
  return metadata;
}
