"""``longdoc serve`` under load and faults, on 127.0.0.1 only (issue 27):

    python -m tools.fuzz.run serve --seed 0          # the full harness, about two minutes
    python -m tools.fuzz.serve_faults --seed 0       # the same

A real server process (``serve.serve`` over the tiny random-weight model of tests/helpers.py, each
decode step slowed to SLOW_TOKEN_S so that generations hold their slots long enough to be raced;
key-less, on a free loopback port) is driven through six scenarios, each bounded in count and time:

* ``streams``: STREAMS concurrent streamed requests (more than ``concurrency + queue``: some get 429);
* ``queued_gone``: the slots held, QUEUED clients queue and leave (half streamed, half not), then a
  new client must be admitted rather than refused;
* ``oversized``: bodies of 10 MB (sent whole), 200 MB (announced, barely sent) and a chunked one past
  the cap, with the latency of a small request timed while each 10 MB body is being refused;
* ``slow``: SLOW_HEADS connections trickling their heads and SLOW_BODIES trickling their bodies, with
  small requests served meanwhile;
* ``malformed``: MALFORMED seeded malformed requests (bad JSON, types, ranges, headers, Host names,
  content types, methods, encodings);
* ``sigterm``: SIGTERM with streams running and queued: the server must exit 0 within the grace.

After each scenario the server must come back to idle (``/health``: nothing admitted, nothing running;
what stays admitted is a leaked slot) and answer; a server that does not is restarted and counted.
Figures go to benchmarks/out/serve_faults.json (benchmarks/report.py renders them): requests tried,
status counts, 5xx (goal 0), slots leaked (goal 0), restarts needed (goal 0), and p50/p99 of the
small request's latency while a 10 MB body is refused (goal under 1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tools.fuzz.cases import REPO

OUT = REPO / "benchmarks" / "out" / "serve_faults.json"
HOST = "127.0.0.1"  # the only address the harness ever talks to
SLOW_TOKEN_S = 0.05
STREAMS, QUEUED, SLOW_HEADS, SLOW_BODIES, MALFORMED, ROUNDS_10MB = 20, 8, 200, 20, 200, 20
CONCURRENCY, QUEUE = 1, 8
HEADERS_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 3.0
SMALL = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 1}

SERVER = r"""
import json, sys, time
from longdoc import serve
from longdoc.config import GenerationConfig, RunConfig
from longdoc.engine import decode
from longdoc.runtime.local import LocalBackend
from longdoc.render import Reporter

opts = json.loads(sys.argv[2])
real = decode.decode_one_token
def slow(*args, **kw):  # generations long enough to hold their slots while the harness races them
    time.sleep(opts["token_s"])
    return real(*args, **kw)
decode.decode_one_token = slow
cfg = RunConfig(model=sys.argv[1], dtype="float32", max_context=3000, generation=GenerationConfig(max_new_tokens=16))
session = LocalBackend(cfg, Reporter(quiet=True))
try:
    serve.serve(
        session, host=opts["host"], port=0, api_key=None, concurrency=opts["concurrency"], queue=opts["queue"],
        headers_timeout_s=opts["headers_timeout_s"], body_timeout_s=opts["body_timeout_s"],
        ready=lambda running: print(running.url, flush=True),
    )
except KeyboardInterrupt:
    sys.exit(130)
"""


class Server:
    """The server process: started, watched (its stderr kept), stopped."""

    def __init__(self, model: str, work: Path, concurrency: int = CONCURRENCY, queue: int = QUEUE):
        self.model, self.work = model, work
        self.opts = {
            "host": HOST,
            "concurrency": concurrency,
            "queue": queue,
            "token_s": SLOW_TOKEN_S,
            "headers_timeout_s": HEADERS_TIMEOUT_S,
            "body_timeout_s": BODY_TIMEOUT_S,
        }
        self.stderr: list[str] = []
        self.start()

    def start(self) -> None:
        env = {
            **os.environ,
            "LONGDOC_CACHE_DIR": str(self.work / "cache"),
            "LONGDOC_DOC_CACHE_DIR": str(self.work / "documents"),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, self.model, json.dumps(self.opts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr or []), daemon=True).start()
        ready = select.select([self.proc.stdout], [], [], 120)[0]
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith(f"http://{HOST}:"):
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {''.join(self.stderr)[-2000:]}")
        self.url = line
        self.port = int(line.rsplit(":", 1)[1].split("/")[0])

    def health(self, timeout: float = 5.0) -> dict[str, Any] | None:
        try:
            return dict(httpx.get(f"http://{HOST}:{self.port}/health", timeout=timeout).json())
        except (httpx.HTTPError, ValueError):
            return None

    def settle(self, timeout: float = 30.0) -> tuple[int, bool]:
        """Wait for idle: (slots still admitted, whether it answers at all)."""
        end = time.monotonic() + timeout
        health = self.health()
        while health is not None and (health["admitted"] or health["running"]) and time.monotonic() < end:
            time.sleep(0.1)
            health = self.health()
        return (health or {}).get("admitted", 0), health is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Tally:
    """What the scenarios saw: every request tried and its outcome."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.tried = 0
        self.problems: list[str] = []

    def saw(self, status: int | str) -> None:
        with self.lock:
            self.tried += 1
            self.statuses[str(status)] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text[:300])

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.isdigit() and int(status) >= 500)


def _threads(targets: list[Callable[[], None]], timeout: float) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))


def _head(port: int, length: int | None, extra: str = "", path: str = "/v1/chat/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def _status(answer: bytes) -> int | str:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "closed" if not answer else "garbled"


def _read_status(sock: socket.socket, timeout: float) -> int | str:
    sock.settimeout(timeout)
    answer = b""
    try:
        while b"\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except TimeoutError:
        return "timeout"
    except OSError:
        return "reset"
    return _status(answer)


# --------------------------------------------------------------------------------------------------
# scenarios


def small(server: Server, tally: Tally, timeout: float = 30.0) -> float | None:
    """One small request: its latency in seconds when answered 200."""
    t0 = time.perf_counter()
    try:
        response = httpx.post(f"{server.url}/chat/completions", json=SMALL, timeout=timeout)
    except httpx.HTTPError as exc:
        tally.saw(type(exc).__name__)
        return None
    tally.saw(response.status_code)
    return time.perf_counter() - t0 if response.status_code == 200 else None


def stream(server: Server, tally: Tally, tokens: int, leave_after: int | None = None) -> str:
    """A streamed request read to its end (or left after ``leave_after`` events): how it ended."""
    body = {"messages": SMALL["messages"], "max_tokens": tokens, "stream": True}
    try:
        with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as response:
            tally.saw(response.status_code)
            if response.status_code != 200:
                return str(response.status_code)
            events = 0
            last = ""
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                events += 1
                last = line
                if leave_after is not None and events >= leave_after:
                    return "left"
            return "done" if last == "data: [DONE]" else "cut"
    except httpx.HTTPError as exc:
        tally.saw(type(exc).__name__)
        return type(exc).__name__


def scenario_streams(server: Server, tally: Tally) -> dict[str, Any]:
    endings: Counter[str] = Counter()
    lock = threading.Lock()

    def one() -> None:
        ending = stream(server, tally, tokens=16)
        with lock:
            endings[ending] += 1

    t0 = time.perf_counter()
    _threads([one] * STREAMS, timeout=120)
    if endings["cut"]:
        tally.problem(f"streams: {endings['cut']} ended without [DONE]")
    return {"streams": STREAMS, "endings": dict(endings), "seconds": round(time.perf_counter() - t0, 2)}


def scenario_queued_gone(server: Server, tally: Tally) -> dict[str, Any]:
    holders = [threading.Thread(target=stream, args=(server, tally, 120, 40), daemon=True) for _ in range(CONCURRENCY)]
    for t in holders:
        t.start()
    end = time.monotonic() + 20
    while (server.health() or {}).get("running", 0) < CONCURRENCY and time.monotonic() < end:
        time.sleep(0.05)

    def gives_up() -> None:
        try:
            httpx.post(f"{server.url}/chat/completions", json={**SMALL, "max_tokens": 8}, timeout=0.5)
        except httpx.TimeoutException:
            tally.saw("left")
            return
        tally.problem("queued_gone: a queued non-streamed client was answered within 0.5 s")

    def hangs_up() -> None:
        stream(server, tally, tokens=8, leave_after=1)

    _threads([gives_up if i % 2 else hangs_up for i in range(QUEUED)], timeout=30)
    end = time.monotonic() + 5
    health = server.health() or {}
    while health.get("admitted", 0) > CONCURRENCY and time.monotonic() < end:
        time.sleep(0.05)
        health = server.health() or {}
    stuck = max(0, health.get("admitted", 0) - CONCURRENCY)
    late = stream(server, tally, tokens=4)  # must wait for a slot, not be refused
    if late != "done":
        tally.problem(f"queued_gone: the next client got {late}")
    for t in holders:
        t.join(60)
    return {"queued_and_left": QUEUED, "still_admitted_after_leaving": stuck, "next_client": late}


def send_body(port: int, declared: int | None, send: int, tally: Tally, chunked: bool = False) -> int | str:
    """A request announcing ``declared`` bytes of body and sending ``send`` of them: its status."""
    try:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            if chunked:
                sock.sendall(_head(port, None, "Transfer-Encoding: chunked\r\n"))
                piece = b"x" * 65536
                sent = 0
                while sent < send:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(_head(port, declared))
                block = b" " * (1 << 20)
                sent = 0
                while sent < send:
                    sock.sendall(block[: min(len(block), send - sent)])
                    sent += min(len(block), send - sent)
            status = _read_status(sock, 30)
    except OSError as exc:  # the server closed first: a reset is a refusal the client could not read
        status = "reset" if isinstance(exc, ConnectionResetError | BrokenPipeError) else type(exc).__name__
    tally.saw(status)
    return status


def scenario_oversized(server: Server, tally: Tally) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    for _ in range(ROUNDS_10MB):
        result: list[int | str] = []

        def refused(into: list[int | str] = result) -> None:
            into.append(send_body(server.port, 10_000_000, 10_000_000, tally))

        big = threading.Thread(target=refused)
        big.start()
        time.sleep(0.01)  # the big body is on its way
        latency = small(server, tally)
        big.join(60)
        statuses[str(result[0] if result else "hang")] += 1
        if latency is not None:
            latencies.append(latency)
    statuses["200MB announced: " + str(send_body(server.port, 200_000_000, 4096, tally))] += 1
    statuses["chunked past the cap: " + str(send_body(server.port, None, 3 << 20, tally, chunked=True))] += 1
    latencies.sort()
    return {
        "refusals": dict(statuses),
        "small_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "small_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None,
        "small_answered": len(latencies),
        "rounds": ROUNDS_10MB,
    }


def trickle(
    server: Server, socks: list[socket.socket], byte: bytes, answers: Counter[str], limit_s: float
) -> tuple[int, float | None, list[float | None]]:
    """Send ``byte`` on each of ``socks`` every 0.2 s until the server closes or answers them all (an
    answer is counted in ``answers``), with a small request each round: (left open, seconds until the
    last was closed, the small requests' latencies)."""
    t0 = time.monotonic()
    done: dict[int, float] = {}
    served: list[float | None] = []
    while time.monotonic() - t0 < limit_s and len(done) < len(socks):
        for i, sock in enumerate(socks):
            if i in done:
                continue
            if select.select([sock], [], [], 0)[0]:
                status = _read_status(sock, 1)
                if status != "closed":
                    answers[str(status)] += 1
                done[i] = time.monotonic() - t0
                continue
            try:
                sock.sendall(byte)
            except OSError:
                done[i] = time.monotonic() - t0
        served.append(small(server, SILENT, timeout=10))
        time.sleep(0.2)
    return len(socks) - len(done), max(done.values()) if done else None, served


SILENT = Tally()  # small requests whose outcome is reported by the scenario itself


def scenario_slow(server: Server, tally: Tally) -> dict[str, Any]:
    """Heads that never end (no slot is taken before a whole head): small requests go on being served;
    then bodies that trickle (each holds a queue place until its deadline, as any admitted request
    would): 408 for those admitted, 429 for the rest."""
    results: dict[str, Any] = {}
    for phase, count, opening, byte in (
        ("heads", SLOW_HEADS, f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode(), b"x"),
        ("bodies", SLOW_BODIES, _head(server.port, 1000), b" "),
    ):
        socks: list[socket.socket] = []
        answers: Counter[str] = Counter()
        try:
            for _ in range(count):
                sock = socket.create_connection((HOST, server.port), timeout=10)
                sock.sendall(opening)
                socks.append(sock)
            tally.tried += count
            limit = HEADERS_TIMEOUT_S + BODY_TIMEOUT_S + 10
            left_open, last_closed, served = trickle(server, socks, byte, answers, limit)
        finally:
            for sock in socks:
                sock.close()
        for status, n in answers.items():
            tally.statuses[f"slow {phase} {status}"] += n
        results[phase] = {
            "connections": count,
            "left_open": left_open,
            "all_closed_after_s": round(last_closed, 2) if last_closed is not None else None,
            "answers": dict(answers),
            "small_requests_meanwhile": len(served),
            "small_answered_meanwhile": sum(1 for latency in served if latency is not None),
        }
        if left_open:
            tally.problem(f"slow {phase}: {left_open} connections left open")
    if results["heads"]["small_answered_meanwhile"] < results["heads"]["small_requests_meanwhile"]:
        tally.problem("slow heads: small requests were refused meanwhile")
    tally.tried += SILENT.tried
    for status, n in SILENT.statuses.items():
        tally.statuses[status] += n
    SILENT.statuses.clear()
    SILENT.tried = 0
    return results


def malformed_cases(seed: int, port: int) -> Iterator[tuple[str, bytes]]:
    """``MALFORMED`` raw requests from ``seed``: (kind, the bytes sent)."""
    rng = random.Random(f"serve:{seed}")
    user = {"role": "user", "content": "Hi"}

    def post(body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> bytes:
        fields = {"Host": f"{HOST}:{port}", "Content-Type": "application/json", **(headers or {})}
        fields.setdefault("Content-Length", str(len(body)))
        head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
        return f"POST {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body

    def js(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    values: list[Any] = [None, True, -1, 0, 2**64, -(2**70), 1e308, -1e308, 1e-320, "x", "", [], {}, [1], {"a": 1}]
    fields = ["max_tokens", "temperature", "top_p", "seed", "n", "stream", "stop", "model", "longdoc_prefix_chars"]
    fields += ["response_format", "logit_bias", "tool_choice", "presence_penalty", "top_logprobs", "stream_options"]
    fields += ["messages", "max_completion_tokens", "logprobs", "tools"]
    makers: list[tuple[str, Callable[[], bytes]]] = [
        ("field value", lambda: post(js({"messages": [user], rng.choice(fields): rng.choice(values)}))),
        ("message shape", lambda: post(js({"messages": [rng.choice(values), user][: rng.randint(1, 2)]}))),
        ("role", lambda: post(js({"messages": [{"role": rng.choice(values), "content": "x"}]}))),
        ("content", lambda: post(js({"messages": [{"role": "user", "content": rng.choice(values)}]}))),
        ("truncated JSON", lambda: post(js({"messages": [user]})[: rng.randint(0, 20)])),
        ("random bytes", lambda: post(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))))),
        ("deep nesting", lambda: post(b"[" * rng.randint(1000, 200_000))),
        ("NaN", lambda: post(b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')),
        ("huge integer", lambda: post(b'{"messages": [], "seed": ' + b"9" * rng.randint(5000, 50000) + b"}")),
        ("lone surrogate", lambda: post(b'{"messages": [{"role": "user", "content": "\\ud800 x"}], "max_tokens": 1}')),
        ("content type", lambda: post(js({"messages": [user]}), {"Content-Type": rng.choice(["text/plain", ""])})),
        ("Host", lambda: post(js({"messages": [user]}), {"Host": rng.choice(["attacker.example", "evil:1", ""])})),
        ("length lies", lambda: post(js({"messages": [user]}), {"Content-Length": str(rng.choice([0, 5, -1]))})),
        ("path", lambda: post(js({"messages": [user]}), path=rng.choice(["/v1/../etc/passwd", "/v2/x", "/%00"]))),
        (
            "method",
            lambda: (
                f"{rng.choice(['PUT', 'DELETE', 'TRACE', 'BREW'])} /v1/chat/completions HTTP/1.1\r\n"
                f"Host: {HOST}\r\nConnection: close\r\n\r\n".encode()
            ),
        ),
        ("head too big", lambda: post(js({"messages": [user]}), {"X-Big": "y" * rng.randint(20_000, 60_000)})),
        ("bad request line", lambda: b"GARBAGE\x00\xff\r\n\r\n"),
    ]
    for _ in range(MALFORMED):
        kind, make = rng.choice(makers)
        yield kind, make()


def scenario_malformed(server: Server, tally: Tally, seed: int) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for kind, raw in malformed_cases(seed, server.port):
        kinds[kind] += 1
        try:
            with socket.create_connection((HOST, server.port), timeout=10) as sock:
                sock.sendall(raw)
                status = _read_status(sock, 30)
        except OSError as exc:
            status = type(exc).__name__
        tally.saw(status)
        statuses[str(status)] += 1
        if not (isinstance(status, int) and 400 <= status < 500) and status not in (200, "reset"):
            tally.problem(f"malformed {kind}: {status}")
    return {"requests": MALFORMED, "statuses": dict(sorted(statuses.items())), "kinds": dict(sorted(kinds.items()))}


def scenario_sigterm(server: Server, tally: Tally) -> dict[str, Any]:
    endings: Counter[str] = Counter()
    lock = threading.Lock()

    def one() -> None:
        body = {"messages": SMALL["messages"], "max_tokens": 200, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as response:
                tally.saw(response.status_code)
                lines = [line for line in response.iter_lines() if line.startswith("data:")]
            ending = "error event, [DONE]" if lines[-2:-1] and '"error"' in lines[-2] else "other"
            ending = "429" if response.status_code == 429 else ending
        except httpx.HTTPError as exc:
            ending = type(exc).__name__
        with lock:
            endings[ending] += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(CONCURRENCY + QUEUE)]
    for t in threads:
        t.start()
    end = time.monotonic() + 20
    while (server.health() or {}).get("admitted", 0) < CONCURRENCY + QUEUE and time.monotonic() < end:
        time.sleep(0.05)
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
        server.proc.kill()
        server.proc.wait()
    took = time.perf_counter() - t0
    for t in threads:
        t.join(10)
    # uvicorn drains, then ends the process by the signal it caught again (exit status 143 in a shell)
    if code not in (0, -signal.SIGTERM):
        tally.problem(f"sigterm: exit {code}")
    return {"streams": CONCURRENCY + QUEUE, "exit_code": code, "exit_s": round(took, 2), "endings": dict(endings)}


# --------------------------------------------------------------------------------------------------
# the run


def run_serve(seed: int = 0, scenarios: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The harness (or the named ``scenarios`` of it); returns the figures."""
    from tests.helpers import save_chat_model

    wanted = scenarios or ("streams", "queued_gone", "oversized", "slow", "malformed", "sigterm")
    tally = Tally()
    results: dict[str, Any] = {}
    leaked = restarts = 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longdoc-serve-faults-") as tmp:
        work = Path(tmp)
        model = save_chat_model(work / "tiny")
        server = Server(model, work)
        try:
            for name in wanted:
                t0 = time.perf_counter()
                if name == "malformed":
                    results[name] = scenario_malformed(server, tally, seed)
                else:
                    results[name] = globals()[f"scenario_{name}"](server, tally)
                results[name]["seconds"] = round(time.perf_counter() - t0, 2)
                print(f"serve {name}: {json.dumps(results[name])[:400]}", file=sys.stderr)
                if name == "sigterm":
                    continue  # the server is gone, as asked
                admitted, alive = server.settle()
                leaked += admitted
                results[name]["slots_leaked"] = admitted
                if not alive or small(server, tally) is None:
                    restarts += 1
                    tally.problem(f"{name}: the server stopped answering; restarted")
                    server.stop()
                    server.start()
        finally:
            server.stop()
    bugs = [line.strip() for line in server.stderr if "request failed" in line or "Traceback" in line]
    oversized = results.get("oversized", {})
    return {
        "seed": seed,
        "host": HOST,
        "server": {k: v for k, v in server.opts.items() if k != "host"},
        "requests_tried": tally.tried,
        "statuses": dict(sorted(tally.statuses.items())),
        "server_errors_5xx": tally.server_errors,
        "slots_leaked": leaked,
        "restarts_needed": restarts,
        "small_p50_while_10mb_refused_s": oversized.get("small_p50_s"),
        "small_p99_while_10mb_refused_s": oversized.get("small_p99_s"),
        "server_bug_lines": bugs[:20],
        "problems": tally.problems[:50],
        "scenarios": results,
        "total_s": round(time.perf_counter() - t_all, 1),
    }


def save(figures: dict[str, Any], out: Path = OUT) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1) + "\n")


def failed(figures: dict[str, Any]) -> bool:
    p99 = figures.get("small_p99_while_10mb_refused_s")
    return bool(
        figures["server_errors_5xx"]
        or figures["slots_leaked"]
        or figures["restarts_needed"]
        or figures["problems"]
        or figures["server_bug_lines"]
        or (p99 is not None and p99 >= 1.0)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    figures = run_serve(args.seed)
    save(figures, args.out)
    summary = {k: v for k, v in figures.items() if k not in ("scenarios", "statuses")}
    print(json.dumps(summary), file=sys.stderr)
    return 1 if failed(figures) else 0


if __name__ == "__main__":
    sys.exit(main())
