#!/usr/bin/env python3
"""Idle keep-alive connections: the memory each one costs, canary-proxy vs nginx.

What it measures
    One upstream (nginx, 1 worker, `GET /` answers a small 200 body) and, one after the
    other, each contestant as a reverse proxy in front of it: canary-proxy (generated
    canary.toml: one backend v1, `workers = 1`, admin on a free port) and nginx
    (`worker_processes 1`, proxy_pass to an upstream block with `keepalive 256`, as
    benches/load.py sets it up). With --baseline PATH a second canary-proxy binary runs too,
    as contestant "canary@base", with the same config.

    Per contestant and round, on a freshly started proxy (so memory freed by an earlier round
    cannot be reused and hide the growth): wait until it answers 200, send a few warm-up
    requests (the upstream pool, the allocator's first arenas), wait 1 s and read its RSS
    ("before": the sum of VmRSS from /proc/PID/status over its processes: nginx's master and
    worker, canary-proxy's one process). Then open N client connections (non-blocking
    sockets driven by `selectors`, at most --parallel in flight), send one
    `GET / HTTP/1.1` with Host on each and read its whole response; the connections stay
    open, idle, in keep-alive. Wait --settle seconds (2) and read the RSS again ("after").
    The figure is (after - before) / connections open, in bytes per idle connection.

    Then it checks that the connections are still there: a non-blocking MSG_PEEK on every
    one (EOF or a reset means the proxy closed it), and a second full request on an evenly
    spread sample of 50. The idle timeouts are set far above the run (canary-proxy
    `header_read_timeout`, which also ends idle keep-alive pauses, and nginx
    `keepalive_timeout`: --idle-timeout, 300 s), so a closed connection is a finding.
    Finally all client connections are closed and the proxy is stopped.

    Rounds (--rounds, 2) run the contestants back to back (canary, canary@base, nginx); the
    table gives medians over rounds, and the connections-alive column the worst round.

How to run
    cargo build --release                        # the script does not build
    python3 benches/idle_conns.py                # 5000 connections, 2 rounds: about 1 min
    python3 benches/idle_conns.py --connections 2000 --rounds 3
    python3 benches/idle_conns.py --baseline ../wt-base/target/release/canary-proxy
    python3 benches/idle_conns.py --json         # the raw figures of every run, as JSON

    Standard library only; needs `nginx` (nginx-light) and installs nothing (exit 2 with the
    apt-get line when it is missing). Measures target/release/canary-proxy unless --binary.
    Raises its own soft RLIMIT_NOFILE to the hard limit (the proxies get the same in their
    child before exec; nginx also gets worker_rlimit_nofile and worker_connections >= 2N +
    100), so N must fit under the hard limit. Everything listens on 127.0.0.1 on free ports;
    configs and logs live in a temp dir that is removed at the end (kept, and its path
    printed, when something failed). Bounded in time: connecting and requesting give up after
    --phase-timeout seconds, the whole run after --max-time; every process started is
    killed on exit. The markdown table goes to stdout, progress to stderr.
"""

import argparse
import atexit
import ctypes
import errno
import grp
import http.client
import json
import os
import pwd
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import (  # noqa: E402  (load.py beside this file)
    Interrupted,
    _interrupt,
    children_of,
    free_ports,
    log,
    tail,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANARY_BIN = os.path.join(ROOT, "target", "release", "canary-proxy")
NEEDS = "needs: apt-get install nginx-light"
BASE = "canary@base"  # the --baseline binary
SAMPLE = 50  # connections that get a second request after the measurement
WARMUP_REQUESTS = 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", "-n", type=int, default=5000, metavar="N",
                   help="idle client connections per run (default 5000)")
    p.add_argument("--rounds", type=int, default=2, help="runs per contestant (default 2)")
    p.add_argument("--binary", default=CANARY_BIN, metavar="PATH",
                   help="canary-proxy binary (default target/release/canary-proxy)")
    p.add_argument("--baseline", default="", metavar="PATH",
                   help=f"a second canary-proxy binary, measured as contestant {BASE}")
    p.add_argument("--no-nginx", action="store_true",
                   help="leave the nginx proxy out (nginx still runs as the upstream)")
    p.add_argument("--parallel", type=int, default=100,
                   help="connections being opened and requested at once (default 100)")
    p.add_argument("--settle", type=float, default=2.0, metavar="SECONDS",
                   help="wait between the last response and the RSS reading (default 2)")
    p.add_argument("--idle-timeout", type=int, default=300, metavar="SECONDS",
                   help="canary-proxy header_read_timeout and nginx keepalive_timeout "
                        "(default 300)")
    p.add_argument("--phase-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="opening and requesting all connections gives up after this "
                        "(default 60)")
    p.add_argument("--max-time", type=int, default=900, metavar="SECONDS",
                   help="the whole run is stopped after this (default 900)")
    p.add_argument("--json", action="store_true",
                   help="print the raw figures of every run as JSON instead of the table")
    a = p.parse_args()
    if a.connections < 1 or a.rounds < 1 or a.parallel < 1:
        p.error("--connections, --rounds and --parallel must be at least 1")
    if a.idle_timeout < 10:
        p.error("--idle-timeout must be at least 10 (it must outlast the measurement)")
    a.binary = os.path.abspath(a.binary)
    a.baseline = os.path.abspath(a.baseline) if a.baseline else ""
    for flag, path in (("--binary", a.binary), ("--baseline", a.baseline)):
        if path and not (os.path.isfile(path) and os.access(path, os.X_OK)):
            p.error(f"{flag} {path}: not an executable file"
                    + ("; run cargo build --release" if path == CANARY_BIN else ""))
    a.contestants = ["canary"] + ([BASE] if a.baseline else []) + ([] if a.no_nginx
                                                                    else ["nginx"])
    return a


# ---------------------------------------------------------------------------------------------
# Processes: every process started is tracked and killed on exit (as in load.py)
# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup():
    # In the child before exec: get SIGKILL if this script dies without cleaning up, and as
    # many descriptors as the hard limit allows (the proxies hold N client sockets).
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes:
    """Starts processes in their own process group and stops them (TERM, then KILL)."""

    def __init__(self):
        self.procs = []  # Popen

    def start(self, argv, logfile, env=None):
        out = open(logfile, "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env, start_new_session=True, preexec_fn=_child_setup)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group this script created for it
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


# ---------------------------------------------------------------------------------------------
# Small helpers (the rest come from load.py)
# ---------------------------------------------------------------------------------------------

def wait_serving(port, proc, name, logfile, timeout=10.0):
    """Until GET / on port answers 200 (the proxy reaches the upstream)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; log {logfile}:\n"
                               + tail(logfile))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"{name} not serving 200 on 127.0.0.1:{port} after {timeout}s "
                       f"({last}); log {logfile}:\n" + tail(logfile))


def warm_up(port, n=WARMUP_REQUESTS):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(n):
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"warm-up request got {resp.status}")
    conn.close()


def memory(pids):
    """Sums of VmRSS, RssAnon and VmHWM (KiB) over pids, and their open descriptors."""
    out = {"VmRSS": 0, "RssAnon": 0, "VmHWM": 0, "fds": 0}
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] += int(line.split()[1])
        try:
            out["fds"] += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def nginx_common(prefix, worker_connections):
    """Lines every nginx instance needs: pid, error log, limits, temp paths in the temp dir."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    lines = [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"worker_rlimit_nofile {min(hard, max(worker_connections + 100, 20000))};",
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log warn;",
    ]
    if os.geteuid() == 0:
        # Workers would otherwise run as nobody and could not read the 0700 temp dir.
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines.append(f"user {user} {group};")
    lines.append(f"events {{ worker_connections {worker_connections}; }}")
    temps = "\n".join(f"    {k}_temp_path {prefix}/tmp_{k};"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return "\n".join(lines), temps


def write_upstream_conf(tmp, port):
    prefix = os.path.join(tmp, "upstream")
    os.makedirs(prefix)
    common, temps = nginx_common(prefix, 10240)
    conf = f"""{common}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{temps}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ return 200 "hello from v1\\n"; }}
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return prefix, path


def write_nginx_proxy_conf(tmp, name, port, upstream_port, n, idle_timeout):
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix)
    common, temps = nginx_common(prefix, 2 * n + 100)
    conf = f"""{common}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout {idle_timeout}s;
{temps}
    upstream canary {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://canary;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return prefix, path


def write_canary_conf(tmp, name, port, admin_port, upstream_port, idle_timeout):
    conf = f"""[proxy]
listen = "127.0.0.1:{port}"
workers = 1
request_timeout = "30s"
# Also ends idle keep-alive pauses: far above the measurement, so none is closed.
header_read_timeout = "{idle_timeout}s"
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:{admin_port}"

[[backend]]
name = "v1"
urls = ["http://127.0.0.1:{upstream_port}"]
weight = 100
"""
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(conf)
    return path


# ---------------------------------------------------------------------------------------------
# Starting things
# ---------------------------------------------------------------------------------------------

def start_upstream(procs, tmp):
    (port,) = free_ports(1)
    prefix, conf = write_upstream_conf(tmp, port)
    logf = os.path.join(prefix, "stdout.log")
    proc = procs.start(["nginx", "-p", prefix, "-c", conf], logf)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream nginx exited with {proc.returncode}:\n" + tail(logf))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("upstream nginx not listening after 10s:\n" + tail(logf))
            time.sleep(0.05)


def start_contestant(args, procs, tmp, who, rnd, upstream_port):
    """Starts a fresh proxy; returns (Popen, client port, function giving its pids)."""
    tag = f"{who.replace('@', '-')}-r{rnd}"
    if who == "nginx":
        (port,) = free_ports(1)
        prefix, conf = write_nginx_proxy_conf(tmp, tag, port, upstream_port,
                                              args.connections, args.idle_timeout)
        logf = os.path.join(prefix, "stdout.log")
        proc = procs.start(["nginx", "-p", prefix, "-c", conf], logf)
        pids = lambda: [proc.pid] + children_of(proc.pid)  # master + worker
    else:
        binary = args.baseline if who == BASE else args.binary
        port, admin = free_ports(2)
        conf = write_canary_conf(tmp, tag, port, admin, upstream_port, args.idle_timeout)
        check = subprocess.run([binary, "check", "--config", conf], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"{who} ({binary}) check rejected the generated config:\n"
                               f"{check.stdout}{check.stderr}")
        logf = os.path.join(tmp, f"{tag}.log")
        proc = procs.start([binary, "--config", conf], logf,
                           env=dict(os.environ, RUST_LOG="warn"))
        pids = lambda: [proc.pid]
    wait_serving(port, proc, who, logf)
    return proc, port, pids, logf


# ---------------------------------------------------------------------------------------------
# Client connections: one request each, non-blocking
# ---------------------------------------------------------------------------------------------

def response_done(buf):
    """(complete, error) for the response bytes so far; error names a response that cannot
    leave the connection open in keep-alive."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False, None
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split()
    status = parts[1] if len(parts) > 1 else "?"
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip().lower()
    if status != "200":
        return True, f"status {status}"
    if "close" in headers.get("connection", ""):
        return True, "Connection: close"
    body = buf[end + 4:]
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"]), None
    if "chunked" in headers.get("transfer-encoding", ""):
        return body.endswith(b"0\r\n\r\n"), None
    return True, "response without length"


class Exchange:
    __slots__ = ("sock", "state", "sent", "buf")

    def __init__(self, sock, state):
        self.sock, self.state, self.sent, self.buf = sock, state, 0, b""


def exchange(port, parallel, timeout, count=0, socks=()):
    """Sends one GET / on each of socks, or on count new connections, at most parallel at
    a time, and reads each whole response. Returns (sockets that got a complete keep-alive
    200, {failure: count}); failed sockets are closed."""
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "User-Agent: idle-conns-bench\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    todo = list(socks)
    to_open = count
    ok, failures = [], {}
    active = 0
    deadline = time.monotonic() + timeout

    def fail(x, why):
        nonlocal active
        failures[why] = failures.get(why, 0) + 1
        sel.unregister(x.sock)
        x.sock.close()
        active -= 1

    try:
        while to_open or todo or active:
            while active < parallel and (to_open or todo):
                if todo:
                    x = Exchange(todo.pop(), "send")
                else:
                    to_open -= 1
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    err = s.connect_ex(("127.0.0.1", port))
                    if err not in (0, errno.EINPROGRESS):
                        why = f"connect: {errno.errorcode.get(err, err)}"
                        failures[why] = failures.get(why, 0) + 1
                        s.close()
                        continue
                    x = Exchange(s, "connect")
                sel.register(x.sock, selectors.EVENT_WRITE, x)
                active += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                x = key.data
                try:
                    if x.state == "connect":
                        err = x.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail(x, f"connect: {errno.errorcode.get(err, err)}")
                            continue
                        x.state = "send"
                    if x.state == "send":
                        x.sent += x.sock.send(request[x.sent:])
                        if x.sent == len(request):
                            x.state = "recv"
                            sel.modify(x.sock, selectors.EVENT_READ, x)
                        continue
                    data = x.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    fail(x, f"{x.state}: {errno.errorcode.get(e.errno, e.errno)}")
                    continue
                if not data:
                    fail(x, "closed before the response ended")
                    continue
                x.buf += data
                complete, error = response_done(x.buf)
                if error:
                    fail(x, error)
                elif complete:
                    sel.unregister(x.sock)
                    active -= 1
                    ok.append(x.sock)
        # Out of time: whatever is still under way (or not started) failed.
        for key in list(sel.get_map().values()):
            fail(key.data, "timed out")
        for s in todo:
            s.close()
        if todo or to_open:
            failures["not tried (timed out)"] = len(todo) + to_open
    finally:
        sel.close()
    return ok, failures


def still_open(socks):
    """Sockets the proxy has not closed: a non-blocking MSG_PEEK would block (no EOF, no
    reset, no unexpected bytes)."""
    alive, dead = [], {}
    for s in socks:
        try:
            data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            why = "closed by the proxy (EOF)" if not data else "unexpected bytes"
        except BlockingIOError:
            alive.append(s)
            continue
        except OSError as e:
            why = errno.errorcode.get(e.errno, str(e.errno))
        dead[why] = dead.get(why, 0) + 1
    return alive, dead


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def one_run(args, procs, tmp, who, rnd, upstream_port):
    proc, port, pids, logf = start_contestant(args, procs, tmp, who, rnd, upstream_port)
    socks = []
    try:
        warm_up(port)
        time.sleep(1.0)
        before = memory(pids())
        t0 = time.monotonic()
        socks, failures = exchange(port, args.parallel, args.phase_timeout,
                                   count=args.connections)
        open_s = time.monotonic() - t0
        time.sleep(args.settle)
        if proc.poll() is not None:
            raise RuntimeError(f"{who} exited with {proc.returncode} while holding the "
                               f"connections; log {logf}:\n" + tail(logf))
        after = memory(pids())
        opened = len(socks)
        alive, dead = still_open(socks)
        # A second request on an evenly spread sample of the live ones.
        step = max(1, len(alive) // SAMPLE)
        sample = alive[::step][:SAMPLE]
        again, sample_failures = exchange(port, args.parallel, 30, socks=sample)
        per_conn = ((after["VmRSS"] - before["VmRSS"]) * 1024 / opened) if opened else None
        res = {
            "contestant": who, "round": rnd, "connections": args.connections,
            "opened": opened, "open_failures": failures, "open_seconds": round(open_s, 2),
            "before_kib": before, "after_kib": after,
            "bytes_per_conn": per_conn,
            "anon_bytes_per_conn": ((after["RssAnon"] - before["RssAnon"]) * 1024 / opened
                                    if opened else None),
            "alive": len(alive), "closed": dead,
            "sample": len(sample), "sample_ok": len(again), "sample_failures": sample_failures,
        }
        log(f"  round {rnd} {who:<11} opened {opened}/{args.connections} in {open_s:.1f} s"
            + (f" (failed: {failures})" if failures else "")
            + f"; RSS {before['VmRSS'] / 1024:.1f} -> {after['VmRSS'] / 1024:.1f} MiB = "
            + (f"{per_conn / 1024:.2f} KiB/conn" if per_conn is not None else "n/a")
            + f"; alive {len(alive)}/{opened}" + (f" {dead}" if dead else "")
            + f"; second request {len(again)}/{len(sample)} OK"
            + (f" {sample_failures}" if sample_failures else ""))
        return res
    finally:
        for s in socks:
            s.close()
        procs.stop(proc)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def markdown(args, results, info):
    lines = ["# idle keep-alive connections: memory per connection", ""] + info + [
        "",
        "| contestant | RSS before (MiB) | RSS after (MiB) | KiB per idle connection "
        "| connections alive |",
        "|---|---:|---:|---:|---|"]
    notes = []
    for who in args.contestants:
        runs = results[who]
        per = [r["bytes_per_conn"] for r in runs if r["bytes_per_conn"] is not None]
        before = statistics.median(r["before_kib"]["VmRSS"] for r in runs) / 1024
        after = statistics.median(r["after_kib"]["VmRSS"] for r in runs) / 1024
        kib = f"{statistics.median(per) / 1024:.2f}" if per else "n/a"
        if len(per) > 1:
            kib += f" ({min(per) / 1024:.2f}–{max(per) / 1024:.2f})"
        worst = min(runs, key=lambda r: (r["alive"], r["sample_ok"]))
        alive = (f"{worst['alive']}/{args.connections} (2nd request "
                 f"{worst['sample_ok']}/{worst['sample']})")
        lines.append(f"| {who} | {before:.1f} | {after:.1f} | {kib} | {alive} |")
        for r in runs:
            if r["open_failures"]:
                notes.append(f"- ⚠ {who} round {r['round']}: {r['opened']} of "
                             f"{args.connections} opened; failures {r['open_failures']}")
            if r["closed"]:
                notes.append(f"- ⚠ {who} round {r['round']}: closed before the check: "
                             f"{r['closed']}")
            if r["sample_failures"]:
                notes.append(f"- ⚠ {who} round {r['round']}: second request failed: "
                             f"{r['sample_failures']}")
    lines += [""] + notes + ([""] if notes else []) + [
        f"RSS = sum of VmRSS over the proxy's processes (nginx: master + worker), medians over "
        f"{args.rounds} round(s), each on a freshly started proxy: before = after "
        f"{WARMUP_REQUESTS} warm-up requests, after = {args.settle:g} s after the last of the "
        "N responses. KiB per idle connection = (after - before) / connections opened, the "
        "median over rounds (in parentheses the lowest and highest round). Connections alive "
        "= the worst round: not closed by the proxy (MSG_PEEK) after the measurement, and of "
        f"a sample of {SAMPLE} how many answered a second request."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if shutil.which("nginx") is None:
        print("missing: nginx", file=sys.stderr)
        print(NEEDS)
        sys.exit(2)
    limit = raise_fd_limit()
    if args.connections + 200 > limit:
        sys.exit(f"--connections {args.connections}: the open file limit is {limit} (hard); "
                 "this script and the proxies need N + 200")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _interrupt)
    signal.alarm(args.max_time)
    procs = Processes()
    atexit.register(procs.stop_all)
    tmp = tempfile.mkdtemp(prefix="canary-idle-")
    keep = False
    try:
        upstream, upstream_port = start_upstream(procs, tmp)
        info = [f"{args.connections} connections per run, {args.rounds} round(s), "
                f"{args.parallel} opened at a time, RSS read {args.settle:g} s after the last "
                f"response; idle timeouts {args.idle_timeout} s; open file limit {limit}; "
                f"{os.cpu_count()} cores; nginx {nginx_version()}.",
                f"canary: {args.binary}" + (f"; {BASE}: {args.baseline}" if args.baseline
                                            else "")]
        log(info[0])
        log(f"upstream nginx on :{upstream_port}; temp dir {tmp}")
        results = {who: [] for who in args.contestants}
        for rnd in range(1, args.rounds + 1):
            for who in args.contestants:
                if upstream.poll() is not None:
                    raise RuntimeError("the upstream nginx exited")
                results[who].append(one_run(args, procs, tmp, who, rnd, upstream_port))
        if args.json:
            print(json.dumps({"settings": {k: v for k, v in vars(args).items()},
                              "runs": results}, indent=2))
        else:
            print(markdown(args, results, info), end="")
    except Interrupted as e:
        keep = True
        log(f"interrupted by {e} (SIGALRM = --max-time {args.max_time} s); stopping everything")
        sys.exit(130)
    except Exception as e:
        keep = True
        log(f"error: {e}")
        if not isinstance(e, RuntimeError):
            raise
        sys.exit(1)
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().split("/")[-1]


if __name__ == "__main__":
    main()
