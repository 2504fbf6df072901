"""A newcomer's first hour, against real processes (issue 16, items 1-6 and 10).

- Item 1: a `sieve run` stack outlives its workers and its Redis. Every Celery process of the stack is
  killed at once (parents and pool processes, SIGKILL): a Search with late interaction answers within its
  deadline marked DEGRADED, the supervisor starts the workers again (logged, counted in /metrics), and the
  same server (same pid) completes the stage again. Then Redis is killed, likewise. Then the server is
  killed: that, and only that, stops the unit, and nothing outlives it.
- Item 2: a busy port gives one line naming the port and the setting, for `sieve serve` and `sieve run`.
- Item 3: `sieve docs upsert` with bad lines says which line and why, with no traceback (exit code 2).
- Item 4: the Python and TypeScript clients refuse the same bad documents with the same class and message.
- Item 5: `sieve eval --json` prints exactly one JSON document on stdout, `ndcg@10` at its top level.
- Item 6: `sieve index --create --late best_effort` creates the collection with that stage default.
- Item 10: clients/node's own tests pass after a plain `npm ci` in a copy of it (no examples installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sieve

from sieve_cli.stack import free_port, wait_serving
from tests.conftest import MODELS_DIR, ROOT, SEEDED_CROSS_ENCODER, require_bundle

pytestmark = pytest.mark.slow
NOTES = ROOT / "examples" / "data" / "notes.jsonl"
CLI = [sys.executable, "-m", "sieve_cli.main"]
SEARCH_DEADLINE_S = 8.0  # the client's deadline for each Search; the stage gives up after 2 s (the default)
BACK_WITHIN_S = 120.0  # restart backoff + a worker's start and model load on a loaded 2-core machine


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")])
    env.update(values)
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = commands.get(child, "")
        todo += children.get(child, [])
    return found


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    address: str
    grpc_port: int
    redis_port: int
    metrics_port: int
    log: Path

    def processes(self, needle: str) -> list[int]:
        return [pid for pid, cmd in _descendants(self.proc.pid).items() if needle in cmd]

    def server_pid(self) -> int:
        [pid] = [p for p, cmd in _descendants(self.proc.pid).items() if "sieve_cli.main serve" in cmd]
        return pid

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as page:
            return str(page.read().decode())


@pytest.fixture
def stack(tmp_path: Path, seeded_models: Path) -> Iterator[Stack]:
    """`sieve run` with a (seeded) cross-encoder: the one stage that still needs workers (late interaction
    runs in the server from stored token vectors), so the stack starts embed, colbert and cross_encoder
    workers."""
    require_bundle()
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it via scripts/ensure_redis.sh)")
    grpc_port, redis_port, metrics_port = free_port(), free_port(), free_port()
    env = _env(
        SIEVE_DATA_DIR=str(tmp_path / "data"),
        SIEVE_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
        SIEVE_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        SIEVE_LOCAL_REDIS_PORT=str(redis_port),
        SIEVE_MODELS_DIR=str(seeded_models),
        SIEVE_CROSS_ENCODER_MODEL=SEEDED_CROSS_ENCODER,
    )
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    running = Stack(proc, f"127.0.0.1:{grpc_port}", grpc_port, redis_port, metrics_port, log)
    try:
        wait_serving(running.address, timeout=120, proc=proc)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in _descendants(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _rerank_search(client: sieve.SieveClient, collection: str, query: str) -> tuple[int, float]:
    """One Search through late interaction and the cross-encoder: the cross-encoder stage's status (the
    stage that runs on the workers), and how long the call took. Late interaction runs in the server from
    the stored token vectors: it completes whatever happens to the workers or Redis (asserted here)."""
    started = time.monotonic()
    response = client.search(
        collection,
        query,
        top_k=3,
        late_interaction="best_effort",
        late_interaction_keep=5,
        cross_encoder="best_effort",
        cross_encoder_keep=3,
        timeout=SEARCH_DEADLINE_S,
    )
    took = time.monotonic() - started
    status = {s.stage: s.status for s in response.stages}
    assert status[sieve.Stage.STAGE_LATE_INTERACTION] == sieve.StageStatus.STAGE_STATUS_COMPLETED
    return status[sieve.Stage.STAGE_CROSS_ENCODER], took


def _until_completed(client: sieve.SieveClient, collection: str, tag: str) -> int:
    """Searches (a new query each time: no cached scores) until the cross-encoder completes; their count."""
    deadline = time.monotonic() + BACK_WITHIN_S
    for n in range(1, 10_000):
        status, took = _rerank_search(client, collection, f"{tag} query {n}: which animal hunts at night")
        assert took < SEARCH_DEADLINE_S, f"a Search took {took:.1f} s, past its deadline"
        if status == sieve.StageStatus.STAGE_STATUS_COMPLETED:
            return n
        assert time.monotonic() < deadline, (
            f"the cross-encoder did not complete again within {BACK_WITHIN_S}s"
        )
        time.sleep(1.0)
    raise AssertionError("unreachable")


def _restarts(stack: Stack) -> dict[str, float]:
    found = re.findall(r'^sieve_run_restarts_total\{child="([^"]+)"\} (\S+)$', stack.metrics(), re.M)
    return {name: float(value) for name, value in found}


# == item 1 (and 6): the stack stays up ==============================================================
def test_stack_outlives_every_celery_process_and_redis_then_stops_with_the_server(stack: Stack) -> None:
    collection = "newcomer"
    # Item 6: the collection is created by `sieve index --create` with late interaction on by default.
    index = subprocess.run(
        [*CLI, "index", str(NOTES), "--collection", collection, "--create", "--late", "best_effort"]
        + ["--address", stack.address, "--json"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert index.returncode == 0, index.stderr
    with sieve.SieveClient(stack.address) as client:
        defaults = client.get_collection(collection).defaults
        assert defaults.late_interaction == sieve.StageMode.STAGE_MODE_BEST_EFFORT
        _until_completed(client, collection, "warm")
        server_pid = stack.server_pid()

        celery = stack.processes("celery")
        assert len(celery) >= 6, f"expected 3 workers with a pool process each: {celery}"
        for pid in celery:  # all at once: parents and pool processes
            os.kill(pid, signal.SIGKILL)
        status, took = _rerank_search(client, collection, "with every worker dead: which animal purrs")
        assert status == sieve.StageStatus.STAGE_STATUS_DEGRADED
        assert took < SEARCH_DEADLINE_S
        _until_completed(client, collection, "after workers")
        assert stack.server_pid() == server_pid, "the server was restarted"
        assert stack.proc.poll() is None
        restarts = _restarts(stack)
        assert all(restarts.get(f"worker-{q}", 0) >= 1 for q in ("embed", "colbert", "cross_encoder")), (
            restarts
        )
        assert "worker-cross_encoder exited with code -9; restarting it in" in stack.log.read_text()

        # Redis likewise: killed, searches degrade within their deadline, then complete again.
        [redis_pid] = stack.processes("redis-server")
        os.kill(redis_pid, signal.SIGKILL)
        status, took = _rerank_search(client, collection, "with Redis dead: which animal barks")
        assert status == sieve.StageStatus.STAGE_STATUS_DEGRADED and took < SEARCH_DEADLINE_S
        _until_completed(client, collection, "after redis")
        assert stack.server_pid() == server_pid
        assert _restarts(stack).get("redis", 0) >= 1

        # The server's death, and only that, stops the unit; nothing outlives it.
        os.kill(server_pid, signal.SIGKILL)
        assert stack.proc.wait(60) == 1
    log = stack.log.read_text()
    assert "server exited with code -9; stopping everything" in log
    # Item 8: task results are not logged (the index run's embed tasks return kilobytes of vectors).
    succeeded = [line for line in log.splitlines() if "] succeeded in " in line]
    assert succeeded and all(line.endswith("characters, not logged>") for line in succeeded), succeeded[:3]
    assert not _descendants(stack.proc.pid)
    assert not any(_port_open(p) for p in (stack.grpc_port, stack.redis_port, stack.metrics_port))


# == item 2: a busy port ===============================================================================
@pytest.mark.parametrize(
    ("command", "setting"),
    [("serve", "SIEVE_GRPC_ADDRESS"), ("run", "SIEVE_GRPC_ADDRESS"), ("run", "SIEVE_LOCAL_REDIS_PORT")],
)
def test_a_busy_port_gives_one_line_naming_it_and_its_setting(
    tmp_path: Path, command: str, setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(
            SIEVE_DATA_DIR=str(tmp_path),
            SIEVE_MODELS_DIR=str(MODELS_DIR),
            SIEVE_METRICS_ADDRESS="",
            SIEVE_GRPC_ADDRESS=f"127.0.0.1:{port if setting == 'SIEVE_GRPC_ADDRESS' else free_port()}",
            SIEVE_LOCAL_REDIS_PORT=str(port if setting == "SIEVE_LOCAL_REDIS_PORT" else free_port()),
        )
        done = subprocess.run([*CLI, command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"port {port} is already in use" in lines[0] and setting in lines[0]


# == items 3 and 4: bad documents, the same verdicts everywhere =======================================
BAD_DOCUMENTS = [
    {"text": "no id"},
    {"id": "d", "text": "a year as a number", "metadata": {"year": 2020}},
    {"id": True, "text": "a boolean id"},
    {"id": "t", "text": 3},
    {"id": "m"},
]
REASONS = [
    'missing id ("id")',
    '"metadata" must be an object with string values',
    'id ("id") must be a string or an integer',
    '"text" must be a string',
    'missing "text"',
]


def test_sieve_docs_upsert_lists_bad_lines_as_sieve_index_does(
    stack_free_server: str, tmp_path: Path
) -> None:
    lines = [json.dumps({"id": "good", "text": "a good line"})] + [json.dumps(d) for d in BAD_DOCUMENTS]
    lines.append("not json")
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with sieve.SieveClient(stack_free_server) as client:
        client.create_collection("bad-lines")
    run = subprocess.run(
        [*CLI, "docs", "upsert", "bad-lines", str(path), "--address", stack_free_server],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr  # done with bad lines, as `sieve index`
    assert "Traceback" not in run.stderr
    expected = [f"line {n}: {reason}" for n, reason in enumerate(REASONS, 2)]
    expected.append(f"line {len(lines)}: invalid JSON: Expecting value at column 1")
    said = [line.split(f"{path}: ", 1)[1] for line in run.stderr.strip().splitlines()]
    assert said == expected
    assert "upserted 1 documents" in run.stdout
    # `sieve index` (the server reading the same file) gives the same reasons for the same lines.
    index = subprocess.run(
        [*CLI, "index", str(path), "--collection", "bad-lines", "--address", stack_free_server],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert index.returncode == 3, index.stderr
    for n, reason in enumerate(REASONS, 2):
        assert re.search(rf"line {n}( \(id '[^']*'\))?: {re.escape(reason)}", index.stdout), index.stdout
    missing = subprocess.run(
        [
            *CLI,
            "docs",
            "upsert",
            "bad-lines",
            str(tmp_path / "nowhere.jsonl"),
            "--address",
            stack_free_server,
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "is not a file" in missing.stderr


PY_CHECK = """
import json, sys, sieve
client = sieve.SieveClient("127.0.0.1:1")
for doc in json.load(sys.stdin):
    try:
        client.upsert_documents("c", [{"id": "ok", "text": "fine"}, doc])
        print("accepted")
    except sieve.SieveError as exc:
        print(exc.code.name, exc.message)
"""
NODE_CHECK = """
const { SieveClient, InvalidArgumentError } = require(process.argv[1]);
const client = new SieveClient("127.0.0.1:1");
(async () => {
  const docs = JSON.parse(require("fs").readFileSync(0, "utf8"));
  for (const doc of docs) {
    try {
      await client.upsertDocuments("c", [{ id: "ok", text: "fine" }, doc]);
      console.log("accepted");
    } catch (err) {
      if (!(err instanceof InvalidArgumentError)) throw err;
      console.log(`${err.codeName} ${err.message}`);
    }
  }
  client.close();
})();
"""


def test_python_and_typescript_clients_refuse_bad_documents_alike() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (the README's set-up installs Node.js)")
    built = ROOT / "clients" / "node" / "dist" / "src" / "index.js"
    if not built.is_file():
        subprocess.run(["npm", "run", "--silent", "build"], cwd=ROOT / "clients" / "node", check=True)
    docs = json.dumps(BAD_DOCUMENTS)
    py = subprocess.run(
        [sys.executable, "-c", PY_CHECK], input=docs, env=_env(), capture_output=True, text=True
    )
    js = subprocess.run([node, "-e", NODE_CHECK, str(built)], input=docs, capture_output=True, text=True)
    assert py.returncode == 0 and js.returncode == 0, py.stderr + js.stderr
    expected = [f"INVALID_ARGUMENT documents[1]: {reason}" for reason in REASONS]
    assert py.stdout.splitlines() == expected
    assert js.stdout.splitlines() == expected


@pytest.fixture(scope="module")
def stack_free_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain `sieve serve` (no Redis, no workers) for the CLI's own checks."""
    require_bundle()
    address = f"127.0.0.1:{free_port()}"
    env = _env(
        SIEVE_DATA_DIR=str(tmp_path_factory.mktemp("serve")),
        SIEVE_GRPC_ADDRESS=address,
        SIEVE_METRICS_ADDRESS="",
        SIEVE_MODELS_DIR=str(MODELS_DIR),
    )
    proc = subprocess.Popen([*CLI, "serve"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_serving(address, timeout=120, proc=proc)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


# == item 5: `sieve eval --json` keeps its contract ====================================================
def test_sieve_eval_json_is_one_document_with_flat_metrics_and_the_stack_logs_on_stderr(
    tmp_path: Path,
) -> None:
    from tests.integration.test_eval import _write_beir

    require_bundle()
    _write_beir(tmp_path / "tiny")
    argv = [*CLI, "eval", str(tmp_path / "tiny"), "--json", "--late-interaction", "--cascade", "retrieve"]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        env=_env(SIEVE_MODELS_DIR=str(MODELS_DIR)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON document and nothing else (json.loads refuses trailing data)
    first, second = report["runs"]  # in the order asked: --cascade retrieve, then --late-interaction
    assert report["cascade"] == first["cascade"] == "retrieve 100"
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        assert report[key] == first[key]
    assert second["cascade"] == "retrieve 100 > late_interaction 100"
    # The self-started server (zero-shot late interaction needs no Redis and no workers) logged on stderr
    # only: its settings line at start and its stop.
    assert "sieve.server" in done.stderr and "settings: {" in done.stderr and "stopped" in done.stderr


# == item 10: the TypeScript package's own tests after a plain `npm ci` ================================
def test_node_package_tests_pass_after_a_plain_npm_ci(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed (the README's set-up installs Node.js and npm)")
    require_bundle()
    # A copy of clients/node as a clone has it (no node_modules, no dist) and no examples/node install.
    package = tmp_path / "node"
    shutil.copytree(ROOT / "clients" / "node", package, ignore=shutil.ignore_patterns("node_modules", "dist"))
    ci = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=package, capture_output=True, text=True, timeout=600
    )
    assert ci.returncode == 0, ci.stderr[-3000:]
    # The tests start this repository's Python server (SIEVE_ROOT: the repository, as the copy is elsewhere).
    test = subprocess.run(
        [npm, "test"],
        cwd=package,
        env=_env(SIEVE_ROOT=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-2000:]
    assert re.search(r"^# fail 0$", test.stdout, re.M) and re.search(r"^# pass [1-9]", test.stdout, re.M)


# == item 7: the README's Python client example runs as written ========================================
def test_the_readme_python_example_runs_against_a_live_server(stack_free_server: str) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [example] = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S) if "SieveClient(" in b]
    assert '"127.0.0.1:50051"' in example
    code = example.replace('"127.0.0.1:50051"', repr(stack_free_server))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^2 \S+ ", run.stdout, re.M), (
        run.stdout
    )  # the quark document answers "particle physics"
    # The job's last update: JOB_STATE_SUCCEEDED (enums print as numbers, as the README says) with every
    # line of examples/data/notes.jsonl done.
    lines = sum(1 for line in NOTES.read_text().splitlines() if line.strip())
    assert run.stdout.splitlines()[-1] == f"{int(sieve.JobState.JOB_STATE_SUCCEEDED)} {lines} {lines}", (
        run.stdout
    )
