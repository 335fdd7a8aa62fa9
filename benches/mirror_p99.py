#!/usr/bin/env python3
"""Served latency with and without mirroring, at a fixed request rate below saturation.

What it measures
    Two canary-proxy processes from one binary (default target/release/canary-proxy), same
    config (load.py's: v1 90 / v2 10 on its nginx upstream), one with `[mirror] backend =
    "v2"` (every GET served by v1 copied to v2 and compared), one without. Each round runs
    benches/fixed_rate.rs (an open-loop generator: request i is due at i / RATE, latency from
    when it was due, so a stalling proxy is charged for the requests it delays) against each
    proxy in turn, alternating which goes first. The report gives p50/p99/p99.9 per round,
    the medians, the ratio mirror / plain, and the mirror's counts (GET /admin/mirror).

    A third variant, plain+copies, tells the proxy's own cost from the rig's: the plain proxy
    again, while a second generator sends what the copies would (0.9 x RATE GETs: those
    served by v1) straight to v2's port, from the proxy's core at nice 19 as the copy threads
    do. On two cores the copies' upstream is the one nginx that serves v1 too, on the core the
    generator shares, so copies slow served requests there whatever sends them: mirror /
    plain+copies is what the proxy's mirroring itself (admission, capture, hand-over,
    comparison) costs the served requests; mirror / plain is the whole.

    load.py measures at saturation (wrk sends as fast as the proxy answers), where a copy,
    being a second upstream exchange, must cost throughput and latency. The contract's bound
    on what mirroring may cost served requests (p99 within 10%) is about a proxy with CPU to
    spare: this measures that.

How to run
    python3 benches/mirror_p99.py                          # 20,000 req/s, 10 s, 3 rounds
    python3 benches/mirror_p99.py --rate 30000 --rounds 5 --duration 20

    Needs nginx, taskset, cargo (builds the generator with `cargo bench --no-run`), and
    target/release/canary-proxy (`cargo build --release --locked` first). The proxies run on
    PROXY_CPU (default 0), the upstream and the generator on LOAD_CPU (default 1). Everything
    it starts stops at the end, also on Ctrl-C. The report goes to stdout and
    target/mirror-p99.md.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (load.py beside this file: configs, processes, ports)

REPORT_PATH = os.path.join(load.ROOT, "target", "mirror-p99.md")
MIRROR_TOML = '\n[mirror]\nbackend = "v2"\n'
VARIANTS = ("plain", "mirror", "plain+copies")
# The share of requests copied: the GETs v1 serves (load.py's config: v1 90, v2 10).
COPIED_SHARE = 0.9


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=load.CANARY_BIN)
    p.add_argument("--rate", type=float, default=20000, help="requests per second")
    p.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--conns", type=int, default=64)
    a = p.parse_args()
    if a.rate <= 0 or a.duration <= 0 or a.rounds < 1 or a.conns < 1:
        p.error("--rate, --duration, --rounds and --conns must be positive")
    if not os.access(a.binary, os.X_OK):
        p.error(f"{a.binary}: not an executable (cargo build --release --locked first)")
    return a


def generator():
    """Builds benches/fixed_rate.rs; returns its executable."""
    out = subprocess.run(["cargo", "bench", "--bench", "fixed_rate", "--no-run",
                          "--message-format=json"], cwd=load.ROOT, capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "fixed_rate":
            return message["executable"]
    raise RuntimeError("cargo built no fixed_rate executable")


def run_load(exe, port, rate, seconds, conns, load_cpu):
    argv = ["taskset", "-c", str(load_cpu), exe, f"http://127.0.0.1:{port}/", str(rate),
            str(seconds), str(conns)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"fixed_rate failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def copies_alongside(exe, port, rate, seconds, conns, proxy_cpu):
    """Starts the second generator of plain+copies: what the copies would send, from the
    proxy's core at nice 19."""
    argv = ["nice", "-n", "19", "taskset", "-c", str(proxy_cpu), exe,
            f"http://127.0.0.1:{port}/", str(rate * COPIED_SHARE), str(seconds), str(conns)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def mirror_counts(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/admin/mirror", timeout=5) as r:
        return json.load(r)["counts"]


def main():
    args = parse_args()
    for tool in ("nginx", "taskset", "cargo"):
        if not shutil.which(tool):
            print(f"needs {tool}")
            sys.exit(2)
    proxy_cpu = int(os.environ.get("PROXY_CPU", 0))
    load_cpu = int(os.environ.get("LOAD_CPU", 1))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, load._interrupt)
    load.raise_fd_limit()
    procs = load.Processes()
    tmp = tempfile.mkdtemp(prefix="canary-mirror-p99-")
    try:
        exe = generator()
        v1, v2 = load.free_ports(2)
        prefix, conf = load.write_upstream_conf(tmp, v1, v2)
        logf = os.path.join(prefix, "stdout.log")
        upstream = procs.start("upstream", ["taskset", "-c", str(load_cpu), "nginx", "-p",
                                            prefix, "-c", conf], logf)
        load.wait_listening(v1, upstream, "upstream nginx", logf)
        ports = {}
        for variant in VARIANTS[:2]:
            port, admin = load.free_ports(2)
            path = load.write_canary_conf(tmp, port, admin, v1, v2, "", f"{variant}.toml")
            if variant == "mirror":
                with open(path, "a") as f:
                    f.write(MIRROR_TOML)
            log = os.path.join(tmp, f"{variant}.log")
            proc = procs.start(variant, ["taskset", "-c", str(proxy_cpu), args.binary,
                                         "--config", path], log,
                               env=dict(os.environ, RUST_LOG="warn"))
            load.wait_listening(port, proc, f"canary {variant}", log)
            ports[variant] = (port, admin)
        ports["plain+copies"] = ports["plain"]
        for variant in VARIANTS[:2]:
            run_load(exe, ports[variant][0], args.rate, 2, args.conns, load_cpu)  # warm-up
        results = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                extra = None
                if variant == "plain+copies":
                    # Up a little before and after the measured run.
                    extra = copies_alongside(exe, v2, args.rate, args.duration + 2, args.conns,
                                             proxy_cpu)
                    time.sleep(1)
                try:
                    res = run_load(exe, ports[variant][0], args.rate, args.duration,
                                   args.conns, load_cpu)
                finally:
                    if extra is not None:
                        extra.wait(timeout=args.duration + 60)
                results[variant].append(res)
                load.log(f"round {r + 1} {variant:7} p50 {res['p50_ms']:.3f} ms  p99 "
                         f"{res['p99_ms']:.3f} ms  p99.9 {res['p999_ms']:.3f} ms  "
                         f"answered {res['answered']:,}/{res['sent']:,}")
        counts = mirror_counts(ports["mirror"][1])
        text = report(args, results, counts)
        print(text, end="")
        os.makedirs(os.path.dirname(REPORT_PATH), exist_ok=True)
        with open(REPORT_PATH, "w") as f:
            f.write(text)
    except load.Interrupted as e:
        load.log(f"interrupted by {e}; stopping everything")
        sys.exit(130)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, results, counts):
    def med(variant, key):
        return statistics.median(r[key] for r in results[variant])

    lines = [
        "# Served latency with and without mirroring, at a fixed rate", "",
        f"- {args.rate:,.0f} requests/s for {args.duration:g} s per run, {args.conns} "
        f"connections, {args.rounds} rounds (order alternating); binary {args.binary}",
        "- mirror: `[mirror] backend = \"v2\"` (GETs served by v1 copied to v2 and compared); "
        "plain: the same config without it",
        f"- plain+copies: plain, while {COPIED_SHARE * args.rate:,.0f} GETs/s go straight to v2 "
        "from the proxy's core at nice 19 (the copies' load, without the proxy's mirroring)",
        f"- mirror counts: copied {counts['copied']:,}, dropped {counts['dropped']:,}, errors "
        f"{counts['errors']:,}, timeouts {counts['timeouts']:,}, compared {counts['compared']:,}",
        "",
        "| proxy | p50 ms | p99 ms | p99.9 ms | answered / sent (all rounds) |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        answered = sum(r["answered"] for r in results[v])
        sent = sum(r["sent"] for r in results[v])
        lines.append(f"| {v} | {med(v, 'p50_ms'):.3f} | {med(v, 'p99_ms'):.3f} | "
                     f"{med(v, 'p999_ms'):.3f} | {answered:,} / {sent:,} |")
    lines.append("")
    for base in ("plain", "plain+copies"):
        per_round = [m["p99_ms"] / p["p99_ms"] for m, p in zip(results["mirror"], results[base])]
        lines.append(
            f"mirror / {base}, medians: p50 {med('mirror', 'p50_ms') / med(base, 'p50_ms'):.2f}×, "
            f"p99 {med('mirror', 'p99_ms') / med(base, 'p99_ms'):.2f}× (rounds "
            f"{min(per_round):.2f}–{max(per_round):.2f}×)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
