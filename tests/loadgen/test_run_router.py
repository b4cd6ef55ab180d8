"""``credit-router run --router`` against a real ``credit-router serve`` and real sim workers.

What a newcomer met, each as the real processes show it:

1. a run in which no credit completed (a router without workers) exits 3, not 0, and says why;
2. an ``--output`` that cannot be written is one line and exit 2 before any load (the router
   saw no producer submit anything);
3. credits that never got an outcome (the router was killed under them) still have a record
   each in ``--records`` and ``records.jsonl``, status ``no_outcome``;
4. under ``--concurrency``, a draining router's ``router_draining`` rejections make the run
   back off instead of starting a new root the moment a rejected one frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from loadgen import replay
from loadgen.replay import CreditRecord, Replayer, ReplayOptions
from loadgen.workload import load_workload
from router_service.client import RouterClient
from tests.loadgen.workload.test_format import write
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "credit_router"]
LONG_TOKENS = 5000
"""A sim credit of this many output tokens decodes for 20 s (4 ms a token)."""


@dataclass
class Router:
    """A running ``credit-router serve`` (and its sim workers)."""

    producers: str
    workers: str
    http: str
    process: subprocess.Popen[bytes]
    children: list[subprocess.Popen[bytes]]
    argv: list[str]
    log: IO[bytes]
    sim_workers: int = 0

    def restart(self) -> None:
        """Kill the router and start a new incarnation on the same endpoints."""
        self.process.kill()
        self.process.wait(timeout=10)
        self.children.append(self.process)
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http}/status", timeout=2) as response:
            doc: dict[str, Any] = json.load(response)
        return doc

    def wait_for(self, what: str, check: Any, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check(self.status()["totals"]):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"router: {what} did not happen"
            time.sleep(0.05)

    def add_sim_worker(self, name: str) -> None:
        worker = subprocess.Popen(
            [*CLI, "worker", "--router", self.workers, "--name", name, "--executor", "sim",
             "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.children.append(worker)
        self.sim_workers += 1
        count = self.sim_workers
        self.wait_for("the worker's join", lambda t: t["workers"] >= count)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    """``credit-router serve`` on free ports, no workers yet; killed at the end."""
    producer_port, worker_port, http_port = free_port(), free_port(), free_port()
    log = (tmp_path / "router.log").open("wb")
    argv = [
        *CLI, "serve", "--producers", f"tcp://127.0.0.1:{producer_port}",
        "--workers", f"tcp://127.0.0.1:{worker_port}", "--http-port", str(http_port),
        "--drain-deadline-s", "30", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    r = Router(
        producers=f"tcp://127.0.0.1:{producer_port}",
        workers=f"tcp://127.0.0.1:{worker_port}",
        http=f"http://127.0.0.1:{http_port}",
        process=process,
        children=[],
        argv=argv,
        log=log,
    )
    try:
        r.wait_for("start", lambda t: True)
        yield r
    finally:
        for p in [*r.children, r.process]:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        log.close()


def _run(*argv: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "run", *map(str, argv), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(run: subprocess.Popen[str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    out, err = run.communicate(timeout=timeout_s)
    return run.returncode, out, err


def _short(tmp_path: Path, name: str = "short.jsonl") -> Path:
    return write(
        tmp_path,
        {"id": "short", "turns": [{"messages": [{"role": "user", "content": "hi"}],
                                   "output_tokens": 1}]},
        name=name,
    )  # fmt: skip


def _long(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        {"id": "long", "turns": [{"messages": [{"role": "user", "content": "write"}],
                                  "output_tokens": LONG_TOKENS}]},
        name="long.jsonl",
    )  # fmt: skip


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_that_completed_nothing_exits_3_and_says_why(router: Router, tmp_path: Path) -> None:
    # No worker: every credit waits in the router's queue until the run's stop cancels it.
    code, out, err = _finish(
        _run(_short(tmp_path), "--router", router.producers, "--duration-s", "1",
             "--grace-s", "0.3", "--json")
    )  # fmt: skip
    report = json.loads(out)
    assert report["outcomes"] == {"cancelled": report["stopped"]}
    assert report["stopped"] >= 1
    assert report["errors"] == 0
    assert code == 3, err
    last = err.strip().splitlines()[-1]
    assert "no credit completed" in last, err
    assert "is any worker connected to the router?" in last, err


def test_an_output_that_cannot_be_written_is_found_before_any_load(
    router: Router, tmp_path: Path
) -> None:
    router.add_sim_worker("w-0")
    blocker = tmp_path / "file.jsonl"
    blocker.write_text("not a directory\n")
    code, out, err = _finish(
        _run(_short(tmp_path), "--router", router.producers, "--duration-s", "2",
             "--output", blocker / "out")
    )  # fmt: skip
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "--output" in lines[0]
    assert "file.jsonl" in lines[0]
    assert "not a directory" in lines[0]
    assert "Traceback" not in err
    assert out == ""
    totals = router.status()["totals"]
    assert totals["submitted"] == 0, totals  # nothing was sent: found before connecting
    assert blocker.read_text() == "not a directory\n"


def test_credits_without_an_outcome_still_have_a_record(router: Router, tmp_path: Path) -> None:
    router.add_sim_worker("w-0")
    records = tmp_path / "records.jsonl"
    output = tmp_path / "run"
    run = _run(
        _long(tmp_path), "--router", router.producers, "--concurrency", "1",
        "--duration-s", "1", "--grace-s", "0.3", "--records", records, "--output", output,
        "--json",
    )  # fmt: skip
    try:
        router.wait_for("the long credit's dispatch", lambda t: t["in_flight"] >= 1)
        router.process.kill()  # the router dies under it: no outcome will ever come
    finally:
        code, out, err = _finish(run)
    assert code == 3, err
    report = json.loads(out)
    assert report["unfinished"] == 1
    assert report["credits"] == 0
    assert "1 credits without an outcome" in err.strip().splitlines()[-1], err
    for path in (records, output / "records.jsonl"):
        [record] = _records(path)
        assert record["status"] == "no_outcome", record
        assert record["reason"] == "gave_up_waiting"
        assert record["credit_id"] == 1
        assert record["request_id"].endswith("/0")
        assert record["conversation"] == "long"
        assert record["submitted_at_s"] >= 0
        assert "done_at_s" not in record
        assert "stopped" not in record
        assert "output_tokens" not in record
    # The CSV has the same row, and the report rebuilt from the directory the same count.
    assert "no_outcome" in (output / "records.csv").read_text()
    rebuilt = subprocess.run(
        [*CLI, "report", str(output), "--json"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    [again] = json.loads(rebuilt.stdout)
    assert again["unfinished"] == 1
    assert again["credits"] == 0


def test_concurrency_backs_off_a_draining_router(router: Router, tmp_path: Path) -> None:
    router.add_sim_worker("w-0")
    # Another producer's 20 s credit keeps the router draining once it is told to stop.
    holder = _run(_long(tmp_path), "--router", router.producers, "--concurrency", "1",
                  "--sessions", "1")  # fmt: skip
    try:
        router.wait_for("the long credit's dispatch", lambda t: t["in_flight"] >= 1)
        records = tmp_path / "records.jsonl"
        run = _run(
            _short(tmp_path), "--router", router.producers, "--concurrency", "4",
            "--duration-s", "4", "--grace-s", "0.3", "--records", records, "--json",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not records.exists() or len(records.read_text().splitlines()) < 20:
                assert time.monotonic() < deadline, "the run completed nothing"
                assert run.poll() is None, run.communicate()
                time.sleep(0.05)
            router.process.send_signal(signal.SIGTERM)  # drains: rejects every new credit
        finally:
            code, out, err = _finish(run)
        assert router.process.poll() is None, "the router was to drain through the whole run"
    finally:
        holder.kill()
        holder.communicate(timeout=10)
    report = json.loads(out)
    lines = _records(records)
    rejected = [r for r in lines if r["status"] == "rejected"]
    assert rejected, err
    assert {r["reason"] for r in rejected} == {"router_draining"}
    assert report["reasons"] == {"rejected: router_draining": len(rejected)}
    assert report["outcomes"]["completed"] >= 20
    # Without a back-off each rejected root freed its slot for the next at once (tens of
    # thousands in the seconds left). With it: at most the 4 slots per hold of 0.5, 1, 2 s…
    assert len(rejected) <= 4 * 5, len(rejected)
    assert code == 1, err  # rejections are errors, counted and reported as before


async def test_a_new_router_incarnation_ends_the_back_off(
    router: Router, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hold far longer than the test: only the new router's welcome can end it.
    monkeypatch.setattr(replay, "BACKOFF_FIRST_S", 600.0)
    router.add_sim_worker("w-0")
    holder = _run(_long(tmp_path), "--router", router.producers, "--concurrency", "1",
                  "--sessions", "1")  # fmt: skip
    records: list[CreditRecord] = []
    client = RouterClient(router.producers, name="backoff-test")
    await client.connect(timeout_s=10)
    replayer = Replayer(
        load_workload(_short(tmp_path)),
        client,
        ReplayOptions(concurrency=2, duration_s=60, grace_s=0.5, cancel_wait_s=1),
        on_record=records.append,
    )
    task = asyncio.create_task(replayer.run())
    try:
        await asyncio.to_thread(
            router.wait_for, "the long credit's dispatch", lambda t: t["in_flight"] >= 1
        )

        async def until(what: str, check: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 30
            while not check():
                assert not task.done(), task
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.05)

        await until("completions", lambda: replayer.outcomes.get("completed", 0) >= 5)
        router.process.send_signal(signal.SIGTERM)
        await until("a draining rejection", lambda: replayer.outcomes.get("rejected", 0) >= 1)
        await asyncio.sleep(0.3)  # the slots freed by the rejections stay free: held
        held = replayer.submitted
        assert replayer.trees_live == 0
        router.restart()
        await asyncio.to_thread(  # the sim worker joins the new incarnation by itself
            router.wait_for, "the worker's return", lambda t: t["workers"] >= 1
        )
        await until("trees after the restart", lambda: replayer.submitted > held)
        completed = replayer.outcomes.get("completed", 0)
        await until("completions again", lambda: replayer.outcomes["completed"] > completed)
    finally:
        replayer.stop()
        await asyncio.wait_for(task, 30)
        await client.close()
        holder.kill()
        holder.communicate(timeout=10)
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected
    assert {r.reason for r in rejected} == {"router_draining"}
    assert len(rejected) <= 2  # one hold: the two slots' roots, nothing after
