// Generates src/gen (TypeScript messages and @grpc/grpc-js clients) from ../../protos with the pinned
// buf and ts-proto (package.json devDependencies, package-lock.json).
//
//   npm run gen          regenerate src/gen
//   npm run check-gen    regenerate into a temporary directory and fail on any difference from src/gen
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const protos = relative(root, join(root, "..", "..", "protos"));
const buf = join(root, "node_modules", ".bin", "buf");
const target = join(root, "src", "gen");

function generate(base) {
  execFileSync(buf, ["generate", protos, "--template", "buf.gen.yaml", "-o", base], {
    cwd: root,
    stdio: "inherit",
  });
}

function files(dir, prefix = "") {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory()
      ? files(join(dir, entry.name), join(prefix, entry.name))
      : [join(prefix, entry.name)],
  );
}

if (!process.argv.includes("--check")) {
  rmSync(target, { recursive: true, force: true });
  generate(root);
  console.log(`generated ${files(target).length} files in ${relative(root, target)}`);
  process.exit(0);
}

const tmp = mkdtempSync(join(tmpdir(), "sieve-node-gen-"));
try {
  generate(tmp);
  const fresh = join(tmp, "src", "gen");
  const names = [...new Set([...files(fresh), ...files(target)])].sort();
  const problems = [];
  for (const name of names) {
    const a = join(target, name);
    const b = join(fresh, name);
    if (!existsSync(b)) problems.push(`unexpected file (not generated from protos): src/gen/${name}`);
    else if (!existsSync(a)) problems.push(`missing generated file: src/gen/${name}`);
    else if (!readFileSync(a).equals(readFileSync(b))) {
      let diff = "";
      try {
        execFileSync("diff", ["-u", a, b], { encoding: "utf8" });
      } catch (err) {
        diff = err.stdout ?? "";
      }
      problems.push(`stale: src/gen/${name}\n${diff}`);
    }
  }
  if (problems.length) {
    console.error(problems.join("\n"));
    console.error("generated TypeScript is stale: run `npm run gen` in clients/node and commit the result");
    process.exit(1);
  }
  console.log(`generated TypeScript matches protos/ (${names.length} files)`);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
