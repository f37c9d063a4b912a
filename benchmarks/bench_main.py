"""Times a shell command end to end (by default the README's main command) and samples its memory.

Runs the command in its own process group, sums the proportional set size (PSS; RSS where PSS is unreadable)
of every process in the group and of Ray's processes started under it every `--every` seconds, and prints one
line per stage the command logs, stamped with the seconds since start. Ends with wall time, peak memory and
the exit status; `--json FILE` also writes them.

    python benchmarks/bench_main.py                       # the README's first command, as written there
    python benchmarks/bench_main.py -- bash -c 'CMD'      # any other command
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def readme_main_command() -> str:
    """The first line of README.md's first fenced block: the main job on the embedded default."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    if match is None:
        raise SystemExit("error: README.md has no fenced command; pass the command after --")
    return match.group(1).strip().splitlines()[0]


def _memory(proc: psutil.Process) -> int:
    try:
        info = proc.memory_full_info()
        return int(getattr(info, "pss", 0) or info.rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def _tree(root: psutil.Process) -> list[psutil.Process]:
    """The command's processes plus Ray's daemons and workers, which re-parent away from it."""
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["create_time"] and p.info["create_time"] >= root.create_time() - 1 and (
                "ray" in cmd or "raylet" in cmd or "gcs_server" in cmd):
            procs.setdefault(p.pid, p)
    return list(procs.values())


def sample_peak(pid: int, every: float, stop: threading.Event, peak: dict) -> None:
    """Keeps peak['bytes'] at the largest summed PSS seen over the command's processes."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            total = sum(_memory(p) for p in _tree(root))
        except psutil.NoSuchProcess:
            total = 0
        if total > peak["bytes"]:
            peak.update(bytes=total, at=time.perf_counter() - peak["start"])
        stop.wait(every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("command", nargs="*", help="command to time (default: the README's first command)")
    args = parser.parse_args(argv)
    command = " ".join(args.command) if args.command else readme_main_command()
    print(f"bench_main: {command}", flush=True)
    start = time.perf_counter()
    # unbuffered: each line is stamped when it is printed, not when a pipe buffer fills
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peak = {"bytes": 0, "at": 0.0, "start": start}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(proc.pid, args.every, stop, peak), daemon=True)
    sampler.start()
    try:
        for line in proc.stdout:
            print(f"[{time.perf_counter() - start:7.1f}s] {line.rstrip()}", flush=True)
        rc = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    result = {"command": command, "wall_s": round(wall, 1), "peak_pss_gib": round(peak["bytes"] / 2**30, 2),
              "peak_at_s": round(peak["at"], 1), "exit": rc, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"bench_main: wall {wall / 60:.1f} min ({wall:.0f} s), peak memory {result['peak_pss_gib']} GiB "
          f"(PSS summed, at {peak['at']:.0f} s), exit {rc}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
