#!/usr/bin/env python3
"""Load benchmark: canary-proxy vs nginx vs HAProxy, same upstreams, one run.

What it measures
    Three reverse proxies, each pinned to one core (PROXY_CPU, default 0), forward to the
    same two upstreams ("v1" and "v2", one nginx instance listening on two ports) split 9:1.
    wrk and the upstream nginx share the other core (LOAD_CPU, default 1). For every scenario
    and round the proxies run back to back (canary, nginx, haproxy) so drift hits all alike;
    each proxy gets a 1 s warm-up per scenario that is not counted.

    Per run: requests/s, p50 and p99 latency (wrk --latency), non-2xx and socket errors,
    CPU of the proxy's processes per request (utime+stime from /proc/PID/stat), the proxy's
    CPU seconds per wall second ("core util": 100% means it used its whole core), the busy
    share of both cores from /proc/stat (so an overloaded load core is visible), the CPU that
    processes not started here took (a build or tests running alongside: flagged †), and, from
    the upstream's stub_status, the upstream connections opened and requests served (every
    proxied request must reach an upstream: a proxy cannot win by doing less work).

    Scenarios: small GET with 64, 16 and 256 connections; 16 KiB GET; 4 KiB POST (64
    connections each); and canary-proxy alone with and without a background thread that
    flips the v2 weight through the admin API 10 times per second.

    canary-proxy's RSS / high-water mark is reported after the 64-connection small-GET runs
    and at the end.

    Old build vs new build: --baseline PATH (env BASELINE) names a second canary-proxy
    binary, e.g. one built from an older commit in another worktree. It runs as one more
    contestant, "canary@base", with the same generated config (other ports), the same sanity
    checks and the same accounting, right next to canary in every round (canary first in odd
    rounds, canary@base first in even rounds), also in the swaps scenario. The report then
    gives canary/canary@base for req/s, p99 and CPU µs per request, per scenario and in a
    summary table: on a shared, noisy machine only such same-run ratios mean anything.
    --proxies canary,canary@base leaves nginx and HAProxy out (about half the time).

    Cost of a running rollout: --rollout gives canary (and only canary) a [rollout] section
    (v1 -> v2, steps [10, 100], approve [100], step_time 24h: the split stays 90/10 and it
    never promotes) and starts it with POST /admin/rollout/start before the sanity checks;
    canary@base gets the same config without [rollout]. With --baseline
    target/release/canary-proxy both run the same binary, so canary/canary@base is the cost
    of the rollout: its per-version meters on the hot path and its analysis every 5 s. The
    rollout must still be under way after the last run (checked; the report says so).

    Cost of mirroring: --mirror gives canary (and only canary) a [mirror] section with
    backend = "v2" (everything else at its defaults: percent 100, GET and HEAD, max_in_flight
    100, timeout 5s, compare true), so every GET served by v1 (90%) is copied to v2 (the same
    upstream nginx, its other port) beside the served request, from the mirror's own pool,
    and the two answers compared; canary@base gets the same config without [mirror]. The
    copies reach the upstream too, so canary's upstream request count is checked against
    wrk's count plus the copies made in that run. --mirror-slow does the same with a mirror
    that answers slowly: a third backend "v3" (weight 0: it serves nothing; in canary@base's
    config too) on a tiny Python asyncio upstream started here, which answers each request
    (keep-alive) only after SLOW_UPSTREAM_DELAY_S (2 s): at most max_in_flight copies wait at
    a time and the rest are dropped, which must not cost the clients anything. Both need
    --baseline (target/release/canary-proxy: the same binary, so canary/canary@base is the
    cost of mirroring) and are exclusive with each other and with --rollout. The mirror's
    counts are reset after the sanity checks (so they cover the warm-ups and the measured
    runs), logged per run, summed per scenario, and read once more after the last run for
    the report (after the last copies have finished); a run in which no copy was made
    (copied 0) did not measure mirroring and is marked ⚠.

    TLS termination: --tls replaces the scenarios above with three in which every proxy
    terminates TLS on its client listener with the same certificate, a self-signed ECDSA P-256
    one (SAN localhost and 127.0.0.1) made once per run with openssl in the temp dir.
    canary-proxy gets [proxy.tls] cert and key; nginx `listen ... ssl` with ssl_certificate,
    ssl_certificate_key and ssl_protocols TLSv1.2 TLSv1.3 (keep-alive as without TLS);
    HAProxy `bind ... ssl crt` (certificate and key in one file) with ssl-min-ver TLSv1.2. The
    upstreams stay plain HTTP/1.1.
      tls-get64      small GET over 64 kept-alive TLS connections (wrk https://): req/s, p99
                     and CPU µs per request as above.
      tls-handshake  a new TLS connection for every request (wrk -H "Connection: close", 64
                     connections): handshakes per second and CPU µs per handshake. That wrk
                     really reconnects is checked in every run: the TCP connections accepted
                     during it (TcpPassiveOpens of this network namespace from /proc/net/snmp,
                     less the upstream's new connections; connections made by other programs
                     on the machine count too) must be about one per request. nginx's
                     stub_status (on a plain listener of its own) and HAProxy's CumConns (its
                     stats socket) give the proxy's own count beside it. ⚠ when the proxy's
                     count (else the namespace's) is 2% below the requests, or the proxy's
                     count above them by more than the connections open at the end and 2%.
      tls-full       full handshakes whatever the server offers: 16 `openssl s_time -new`
                     processes, each connecting again and again with a new session and one
                     HTTP/1.0 GET / per connection (the server closes). Handshakes per second
                     (connections / wall time) and CPU µs per handshake, no latencies; each
                     process must have read a whole answer per connection on average, and the
                     connection and upstream counts are checked as for tls-handshake. The
                     OpenSSL client costs more CPU than the server's side, so this is bound by
                     the load core: compare CPU µs per handshake, not handshakes per second.
    Session resumption: wrk (OpenSSL) resumes TLS sessions when the server lets it (tickets
    or a session cache; tried: 552 of 553 connections resumed against nginx with tickets on),
    and a resumed handshake skips the certificate and its signature. By default full
    handshakes are measured: nginx has ssl_session_cache off and ssl_session_tickets off,
    HAProxy no-tls-tickets and tune.ssl.cachesize 0; canary-proxy runs as it is configured
    (rustls's default ServerConfig keeps a 256-entry session cache and sends TLS 1.3 tickets
    for it). After the sanity checks a probe connects twice to each proxy with Python's ssl,
    offering the first connection's session on the second; the report says per proxy whether
    it resumed (then wrk's handshakes with that proxy were resumptions: marked ⚠ in the
    handshake table and the summary); tls-full does full handshakes with every proxy, as its
    client never offers a session. --tls-resume lets nginx (shared session cache and tickets)
    and HAProxy (their defaults) resume too, so that tls-handshake measures resumed handshakes
    for all. The report also names,
    per proxy, what an OpenSSL client (openssl s_client: wrk's library and defaults)
    negotiates: protocol, cipher suite, key exchange.

    HTTP/2 cleartext: --h2c replaces the scenarios with one, h2c-get: small GET, h2c from the
    client to the proxy and h2c from the proxy to the upstreams. The client is h2load (prior
    knowledge, -c 16 -m 16: 16 connections, 16 streams each) instead of wrk; p50 and p99 come
    from its per-request log (--log-file); non-2xx answers and failed, errored or timed-out
    streams are errors. The upstream nginx listens with `listen ... http2` (h2c only: an
    HTTP/1.1 request there fails, so a 200 through a proxy shows that it spoke h2c upstream),
    its stub_status on a third, plain port. canary-proxy's backends get protocol = "h2c";
    HAProxy `bind ... proto h2` and `server ... proto h2`; nginx `listen ... http2` and
    grpc_pass grpc://... : nginx's proxy_pass speaks only HTTP/1.x to upstreams, grpc_pass
    speaks h2c and forwards plain GETs (the sanity checks show it), but one request per
    upstream connection at a time (no multiplexing: it opens and keeps up to 256 upstream
    connections). The sanity checks use nghttp (prior knowledge) instead of http.client.

    With --tls or --h2c, --proxies may leave canary out (e.g. --proxies nginx,haproxy, while
    canary-proxy cannot yet run the mode): then nothing is built and no ratio is given. With
    canary and another proxy the report starts with a table of ratios canary/nginx and
    canary/haproxy (req/s, p99, CPU µs per request), in parentheses the lowest and highest
    per-round ratio (the proxies run back to back in every round).

How to run
    python3 benches/load.py                # DURATION=5 s per run, ROUNDS=2 (about 3 min;
                                           # 4.5 min with --baseline)
    python3 benches/load.py --quick        # 2 s runs, 1 round (about 1 min)
    python3 benches/load.py --duration 10 --rounds 3 --no-build
    python3 benches/load.py --wait-idle 600   # shared machine: wait for idle cores, and
                                              # repeat runs disturbed by outside load
    python3 benches/load.py --baseline ../wt-base/target/release/canary-proxy
    python3 benches/load.py --baseline OLD --proxies canary,canary@base   # old vs new only
    python3 benches/load.py --rollout --baseline target/release/canary-proxy \
        --proxies canary,canary@base --scenarios get64,post4k   # a rollout's cost
    python3 benches/load.py --mirror --baseline target/release/canary-proxy \
        --proxies canary,canary@base --scenarios get64     # mirroring's cost (--mirror-slow:
                                                           # with a mirror answering in 2 s)
    python3 benches/load.py --tls --duration 5 --rounds 3 --wait-idle 600   # TLS termination
    python3 benches/load.py --tls --tls-resume --scenarios tls-handshake    # resumed, for all
    python3 benches/load.py --h2c --duration 5 --rounds 3 --wait-idle 600   # h2c to h2c
    python3 benches/load.py --tls --quick --proxies nginx,haproxy           # without canary

    Environment: DURATION, ROUNDS, PROXY_CPU, LOAD_CPU, BASELINE, and CANARY_EXTRA: extra
    lines for canary-proxy's [proxy] table, e.g. CANARY_EXTRA='workers = 1' (several lines
    separated by newlines; used for canary@base too). Needs nginx (nginx-light), haproxy
    (unless --proxies leaves it out), wrk and taskset; --tls needs openssl, --h2c h2load and
    nghttp (apt-get install nghttp2-client); installs nothing. Builds
    target/release/canary-proxy with cargo unless --no-build (never the --baseline binary)
    or --proxies leaves canary out.

    Everything listens on 127.0.0.1 on free ports; configs and logs live in a temp dir that
    is removed at the end (kept, and its path printed, when something failed). The markdown
    report goes to stdout and to target/load-bench.md; progress goes to stderr.
"""

import argparse
import ctypes
import http.client
import json
import os
import platform
import grp
import hashlib
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANARY_BIN = os.path.join(ROOT, "target", "release", "canary-proxy")
REPORT_PATH = os.path.join(ROOT, "target", "load-bench.md")
NEEDS = "needs: apt-get install nginx-light haproxy wrk"
NEEDS_TLS = "needs: apt-get install openssl"
NEEDS_H2C = "needs: apt-get install nghttp2-client (h2load, nghttp)"
BASE = "canary@base"  # the --baseline binary
PROXIES = ("canary", "nginx", "haproxy")  # contestants without --baseline, in run order
ALL_PROXIES = ("canary", BASE, "nginx", "haproxy")  # every contestant, in run order
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP_S = 1
OUTSIDE_LOAD = 0.10  # CPU (share of one core) used by processes not started here: flagged
LOAD_CORE_FULL = 0.95  # load core this busy: wrk + upstream may be what limits the run
POST_BODY_BYTES = 4096
SLOW_UPSTREAM_DELAY_S = 2.0  # --mirror-slow: the mirror's upstream answers after this long
MIRROR_MAX_IN_FLIGHT = 100  # [mirror]'s default max_in_flight (copies running at once)
CONNS_PER_REQ_SLACK = 0.02  # tls-handshake: accepted connections per request 1 ± this (beyond
#                             the connections open at the end), or ⚠


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass
class Settings:
    scenarios: list
    duration: int
    rounds: int
    proxy_cpu: int
    load_cpu: int
    canary_extra: str
    build: bool
    wait_idle: int
    baseline: str = ""  # absolute path of the canary@base binary, "" without --baseline
    proxies: tuple = PROXIES  # contestants, in run order (a subsequence of ALL_PROXIES)
    rollout: bool = False  # canary runs a rollout (--rollout); canary@base does not
    mirror: str = ""  # canary mirrors to this backend: "v2" (--mirror), "v3" (--mirror-slow)
    mode: str = "plain"  # "plain", "tls" (--tls) or "h2c" (--h2c): which scenarios, configs
    tls_resume: bool = False  # --tls-resume: nginx and HAProxy allow session resumption


def parse_settings():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", 5)),
                   help="seconds per measured run (env DURATION, default 5)")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 2)),
                   help="measured runs per proxy per scenario (env ROUNDS, default 2)")
    p.add_argument("--quick", action="store_true", help="duration 2, rounds 1")
    p.add_argument("--scenarios", default="", metavar="KEYS",
                   help="comma-separated subset to run: get64, get16, get256, get16k, post4k, "
                        "swaps; with --tls: tls-get64, tls-handshake, tls-full; with --h2c: "
                        "h2c-get "
                        "(default: all)")
    p.add_argument("--no-build", action="store_true",
                   help="use target/release/canary-proxy as it is, do not run cargo build")
    p.add_argument("--wait-idle", type=int, default=0, metavar="SECONDS",
                   help="for shared machines: spend up to SECONDS in total waiting for both "
                        "cores to be idle (5 s before starting, 2 s before each run) and "
                        "re-running runs disturbed by outside load (up to 2 times each). "
                        "Default 0: never wait, only flag disturbed runs")
    p.add_argument("--baseline", default=os.environ.get("BASELINE", ""), metavar="PATH",
                   help="a second canary-proxy binary (an older build) measured in the same "
                        f"run as contestant {BASE}, next to canary in every round; the "
                        "report adds canary/canary@base ratios (env BASELINE)")
    p.add_argument("--proxies", default="", metavar="NAMES",
                   help="comma-separated contestants: canary, canary@base (or base), nginx, "
                        "haproxy; canary is always needed. Default: all (canary@base only "
                        "with --baseline). E.g. canary,canary@base to compare two builds only")
    p.add_argument("--rollout", action="store_true",
                   help="canary runs a progressive rollout (v1 -> v2 at 90/10, started "
                        f"through the admin API, never promoting during the run); {BASE} "
                        "runs without one. Needs --baseline; --baseline "
                        "target/release/canary-proxy measures the rollout's cost on the same "
                        "binary. Leaves out the swaps scenario (the rollout owns the weights)")
    p.add_argument("--mirror", action="store_true",
                   help="canary mirrors every GET served by v1 to v2 ([mirror] backend = "
                        f"\"v2\", compared); {BASE} runs the same config without [mirror]. "
                        "Needs --baseline, like --rollout")
    p.add_argument("--mirror-slow", action="store_true",
                   help="as --mirror, but the mirror is backend v3 (weight 0) on an upstream "
                        f"started here that answers after {SLOW_UPSTREAM_DELAY_S:g} s: copies "
                        "pile up to max_in_flight and the rest are dropped")
    p.add_argument("--tls", action="store_true",
                   help="every proxy terminates TLS (same self-signed ECDSA P-256 "
                        "certificate); scenarios tls-get64 (kept-alive TLS connections), "
                        "tls-handshake (a new connection per request, wrk) and tls-full (full "
                        "handshakes, openssl s_time -new) instead of the plain ones")
    p.add_argument("--tls-resume", action="store_true",
                   help="with --tls: nginx and HAProxy allow TLS session resumption (by "
                        "default they do not, so handshakes are full ones)")
    p.add_argument("--h2c", action="store_true",
                   help="h2c from the client (h2load) to the proxy and from the proxy to "
                        "h2c upstreams; scenario h2c-get instead of the plain ones")
    a = p.parse_args()
    if a.quick:
        a.duration, a.rounds = 2, 1
    if a.duration < 1 or a.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    if a.tls and a.h2c:
        p.error("--tls and --h2c are exclusive: each has scenarios of its own")
    if a.tls_resume and not a.tls:
        p.error("--tls-resume needs --tls")
    mode = "tls" if a.tls else "h2c" if a.h2c else "plain"
    if mode != "plain" and (a.rollout or a.mirror or a.mirror_slow):
        p.error(f"--{mode} measures the proxies' protocol handling: it cannot be combined with "
                "--rollout, --mirror or --mirror-slow")
    known = [sc.key for sc in MODE_SCENARIOS[mode]] + (["swaps"] if mode == "plain" else [])
    only = [k.strip() for k in a.scenarios.split(",") if k.strip()]
    unknown = [k for k in only if k not in known]
    if unknown:
        with_mode = "" if mode == "plain" else f" with --{mode}"
        p.error(f"unknown scenario {', '.join(unknown)}{with_mode}; known: {', '.join(known)}")
    if a.mirror and a.mirror_slow:
        p.error("--mirror and --mirror-slow are exclusive: canary has one mirror backend")
    if a.rollout and (a.mirror or a.mirror_slow):
        p.error(f"--{'mirror' if a.mirror else 'mirror-slow'} and --rollout are exclusive: "
                f"each measures one section's cost against {BASE}")
    if a.rollout:
        if "swaps" in only:
            p.error("--rollout cannot run the swaps scenario: while a rollout is under way it "
                    "owns the v1/v2 weights and the admin API answers weight writes with 409")
        # Every scenario but swaps when none are named.
        only = only or [k for k in known if k != "swaps"]
    baseline = os.path.abspath(a.baseline) if a.baseline else ""
    # target/release/canary-proxy itself may be the baseline (--rollout: same binary); then
    # it may not exist yet when this script is about to build it.
    same_as_canary = baseline == CANARY_BIN and not a.no_build
    if baseline and not same_as_canary and not (os.path.isfile(baseline)
                                                 and os.access(baseline, os.X_OK)):
        p.error(f"--baseline {a.baseline}: not an executable file")
    default = ALL_PROXIES if baseline else PROXIES
    names = [BASE if n.strip() == "base" else n.strip() for n in a.proxies.split(",")
             if n.strip()]
    unknown = [n for n in names if n not in ALL_PROXIES]
    if unknown:
        p.error(f"unknown proxy {', '.join(unknown)}; known: {', '.join(ALL_PROXIES)}")
    if names and "canary" not in names and mode == "plain":
        p.error("--proxies must include canary (the build under test; only --tls and --h2c "
                "may leave it out)")
    if names and BASE in names and "canary" not in names:
        p.error(f"--proxies {BASE} needs canary too (it is compared with canary)")
    if names and BASE in names and not baseline:
        p.error(f"--proxies {BASE} needs --baseline PATH (or env BASELINE)")
    if names and baseline and BASE not in names:
        p.error(f"--baseline given but --proxies leaves out {BASE}; add it, or unset "
                "BASELINE / drop --baseline")
    proxies = tuple(n for n in ALL_PROXIES if n in names) if names else default
    if a.rollout and BASE not in proxies:
        p.error(f"--rollout compares canary (rollout running) with {BASE} (no rollout) in the "
                "same run: give --baseline PATH, e.g. --baseline target/release/canary-proxy "
                "for the same binary")
    if (a.mirror or a.mirror_slow) and BASE not in proxies:
        p.error(f"--{'mirror' if a.mirror else 'mirror-slow'} compares canary (mirroring) "
                f"with {BASE} (no [mirror]) in the same run: give --baseline PATH, e.g. "
                "--baseline target/release/canary-proxy for the same binary")
    s = Settings(
        scenarios=only or known,
        duration=a.duration,
        rounds=a.rounds,
        proxy_cpu=int(os.environ.get("PROXY_CPU", 0)),
        load_cpu=int(os.environ.get("LOAD_CPU", 1)),
        canary_extra=os.environ.get("CANARY_EXTRA", ""),
        build=not a.no_build,
        wait_idle=a.wait_idle,
        baseline=baseline,
        proxies=proxies,
        rollout=a.rollout,
        mirror="v2" if a.mirror else "v3" if a.mirror_slow else "",
        mode=mode,
        tls_resume=a.tls_resume,
    )
    cpus = os.sched_getaffinity(0)
    if s.proxy_cpu == s.load_cpu or s.proxy_cpu not in cpus or s.load_cpu not in cpus:
        p.error(f"PROXY_CPU={s.proxy_cpu} and LOAD_CPU={s.load_cpu} must be two different "
                f"cores out of {sorted(cpus)}")
    return s


def check_tools(settings):
    tools = ("nginx", "haproxy", "wrk", "taskset")
    if "haproxy" not in settings.proxies:
        tools = ("nginx", "wrk", "taskset")  # nginx is always needed: it is the upstream
    needs = NEEDS
    if settings.mode == "tls":
        tools, needs = tools + ("openssl",), f"{NEEDS}; {NEEDS_TLS}"
    elif settings.mode == "h2c":
        tools, needs = tools + ("h2load", "nghttp"), f"{NEEDS}; {NEEDS_H2C}"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        print(needs)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Processes: every process started is tracked and killed on exit
# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # In the child before exec: get SIGKILL if this script dies without cleaning up.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Starts processes in their own process group and stops them all (TERM, then KILL)."""

    def __init__(self):
        self.procs = []  # (name, Popen)

    def start(self, name, argv, logfile, env=None):
        out = open(logfile, "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        self.procs.append((name, proc))
        return proc

    def run(self, argv, timeout):
        """Runs a short-lived command (wrk) to completion; returns (rc, stdout, stderr)."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_die_with_parent)
        self.procs.append((argv[0], proc))
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            self._stop(proc)
            self.procs.remove((argv[0], proc))
        return proc.returncode, out, err

    def run_many(self, argvs, timeout):
        """Runs several short-lived commands (openssl s_time) at once, to completion; returns
        [(rc, stdout, stderr)] in argvs' order."""
        started = []
        try:
            for argv in argvs:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        start_new_session=True, preexec_fn=_die_with_parent)
                self.procs.append((argv[0], proc))
                started.append(proc)
            deadline = time.monotonic() + timeout
            results = []
            for proc in started:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append((proc.returncode, out, err))
            return results
        finally:
            for proc in started:
                self._stop(proc)
                self.procs.remove((proc.args[0], proc))

    @staticmethod
    def _stop(proc, grace=5.0):
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

    def sessions(self):
        return {proc.pid for _, proc in self.procs}

    def stop_all(self):
        for name, proc in reversed(self.procs):
            self._stop(proc)
        self.procs.clear()


def raise_fd_limit(want=65536):
    """HAProxy with maxconn 10000 needs ~20k descriptors; raise this process's limit (its
    children inherit it). Root may raise the hard limit; otherwise go up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return
        except (ValueError, OSError):
            pass


class Interrupted(Exception):
    pass


def _interrupt(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------------
# Small network helpers
# ---------------------------------------------------------------------------------------------

def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(port, proc, name, logfile, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; log {logfile}:\n"
                               + tail(logfile))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} not listening on 127.0.0.1:{port} after {timeout}s; log "
                       f"{logfile}:\n" + tail(logfile))


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def request(port, method="GET", path="/", body=None, conn=None, headers=None, tls=None):
    """One HTTP/1.1 request; returns (status, headers dict (lower-case), body bytes). tls: the
    TlsFiles whose certificate the server must present (then over TLS)."""
    own = conn is None
    if own:
        conn = client_connection(port, tls)
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/octet-stream")
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    result = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    if own:
        conn.close()
    return result


def client_connection(port, tls=None):
    """An http.client connection to 127.0.0.1:port; over TLS when tls (TlsFiles) is given,
    verifying that the server presents that certificate for 127.0.0.1."""
    if tls is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=5,
                                       context=ssl.create_default_context(cafile=tls.cert))


def tls_resumes(port, tls):
    """Connects twice with Python's ssl (OpenSSL, TLS 1.3 where offered), sending one GET on
    each (TLS 1.3 tickets arrive after the handshake) and offering the first connection's
    session on the second. Returns (protocol, whether the second resumed it)."""
    ctx = ssl.create_default_context(cafile=tls.cert)
    session = None
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            if not data.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"TLS resumption probe on :{port}: {data[:200]!r}")
            session, reused, version = conn.session, conn.session_reused, conn.version()
    return version, reused


def openssl_negotiates(port):
    """What an OpenSSL client with its defaults (wrk's library) negotiates with the server at
    port: "protocol, cipher suite, key exchange" from openssl s_client -brief."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    out = p.stdout + p.stderr
    found = []
    for key in ("Protocol version", "Ciphersuite", "Server Temp Key"):
        m = re.search(rf"^{key}: (.+)$", out, re.M)
        found.append(m.group(1).strip() if m else f"{key} ?")
    if p.returncode != 0 or "CONNECTION ESTABLISHED" not in out:
        raise RuntimeError(f"openssl s_client -connect 127.0.0.1:{port} failed "
                           f"({p.returncode}):\n{out[-1000:]}")
    return ", ".join(found)


def nghttp_get(port, n):
    """n GETs over one h2c connection (prior knowledge) with nghttp, distinct URLs (nghttp
    fetches a repeated URL once); returns their bodies, concatenated."""
    urls = [f"http://127.0.0.1:{port}/?i={i}" for i in range(n)]
    p = subprocess.run(["nghttp"] + urls, capture_output=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"nghttp to :{port} failed ({p.returncode}): "
                           f"{(p.stdout + p.stderr)[-500:]!r}")
    return p.stdout.decode(errors="replace")


def nghttp_head(port):
    """One GET / over h2c; returns (status, headers dict, body) from nghttp -v's frame log."""
    p = subprocess.run(["nghttp", "-v", f"http://127.0.0.1:{port}/"], capture_output=True,
                       timeout=30, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nghttp -v to :{port} failed ({p.returncode}): "
                           f"{(p.stdout + p.stderr)[-500:]!r}")
    headers = dict(re.findall(r"^\[[ \d.]+\] recv \(stream_id=\d+\) ([^:\s][^:]*|:status): "
                              r"(.*)$", p.stdout, re.M))
    body = "".join(line + "\n" for line in p.stdout.splitlines()
                   if line.startswith("hello from "))
    return int(headers.get(":status", 0)), headers, body


def tcp_passive_opens():
    """TCP connections accepted so far in this network namespace (/proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("PassiveOpens")])


def haproxy_info(path):
    """HAProxy's `show info` over its stats socket, as a dict."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)


def proxy_accepts(fleet, proxy):
    """Connections the proxy has accepted, by its own count, before this reading: nginx's
    stub_status accepts, HAProxy's CumConns (both count the reading's own connection, taken
    off here); None for canary-proxy (it has no such count) and without --tls/--h2c."""
    if proxy == "nginx" and "nginx-status" in fleet.ports:
        _, _, body = request(fleet.ports["nginx-status"], path="/nginx_status")
        return int(body.decode().splitlines()[2].split()[0]) - 1
    if proxy == "haproxy" and fleet.haproxy_sock:
        return int(haproxy_info(fleet.haproxy_sock)["CumConns"]) - 1
    return None


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def nginx_common(prefix):
    """Lines every nginx instance needs: pid, error log, temp paths inside the temp dir."""
    lines = [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        "worker_rlimit_nofile 20000;",
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log warn;",
    ]
    if os.geteuid() == 0:
        # Workers would otherwise run as nobody and could not read the 0700 temp dir.
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines.append(f"user {user} {group};")
    lines.append("events { worker_connections 10240; }")
    temps = "\n".join(f"    {k}_temp_path {prefix}/tmp_{k};"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return "\n".join(lines), temps


def write_upstream_conf(tmp, port_v1, port_v2, status_port=None):
    """One nginx with two servers: v1 and v2. `/`, `/16k`, `POST /post`; stub_status on v1.
    status_port (--h2c): v1 and v2 speak h2c only (`listen ... http2`), and stub_status is on
    a third, plain server at status_port (it counts the whole nginx, as on v1)."""
    h2c = status_port is not None
    prefix = os.path.join(tmp, "upstream")
    os.makedirs(prefix)
    servers = []
    for name, port in (("v1", port_v1), ("v2", port_v2)):
        root = os.path.join(prefix, f"www_{name}")
        os.makedirs(root)
        with open(os.path.join(root, "16k"), "wb") as f:
            head = f"16k from {name}\n".encode()
            f.write(head + b"x" * (16384 - len(head)))
        status = ("        location = /nginx_status { stub_status; }\n"
                  if name == "v1" and not h2c else "")
        servers.append(f"""    server {{
        listen 127.0.0.1:{port}{" http2" if h2c else ""} backlog=4096;
        root {root};
        location = / {{ return 200 "hello from {name}\\n"; }}
        location = /16k {{ }}
        location = /post {{
            client_body_buffer_size 16k;
            return 200 "posted to {name}\\n";
        }}
{status}    }}""")
    if h2c:
        servers.append(f"""    server {{
        listen 127.0.0.1:{status_port};
        location = /nginx_status {{ stub_status; }}
    }}""")
    common, temps = nginx_common(prefix)
    conf = f"""{common}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    open_file_cache max=16;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{temps}
{chr(10).join(servers)}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return prefix, path


def write_nginx_proxy_conf(tmp, port, port_v1, port_v2, mode="plain", tls=None,
                           tls_resume=False, status_port=None):
    """mode "tls": `listen ... ssl` with tls's certificate and key, session resumption off
    unless tls_resume; "h2c": `listen ... http2` (prior knowledge) and grpc_pass to the h2c
    upstreams. status_port: a plain server with stub_status (the connections nginx accepted)."""
    prefix = os.path.join(tmp, "nginx-proxy")
    os.makedirs(prefix)
    common, temps = nginx_common(prefix)
    listen = {"plain": "", "tls": " ssl", "h2c": " http2"}[mode]
    forward = """            proxy_pass http://canary;
            proxy_http_version 1.1;
            proxy_set_header Connection "";"""
    if mode == "h2c":
        # proxy_pass speaks HTTP/1.x only; grpc_pass speaks h2c (one stream per upstream
        # connection at a time) and forwards any request, not only gRPC calls.
        forward = "            grpc_pass grpc://canary;"
    ssl = ""
    if mode == "tls":
        resume = ("ssl_session_cache shared:SSL:10m;\n        ssl_session_tickets on;"
                  if tls_resume else
                  "ssl_session_cache off;\n        ssl_session_tickets off;")
        ssl = f"""        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {resume}
"""
    status = ""
    if status_port is not None:
        status = f"""    server {{
        listen 127.0.0.1:{status_port};
        location = /nginx_status {{ stub_status; }}
    }}
"""
    conf = f"""{common}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{temps}
    upstream canary {{
        server 127.0.0.1:{port_v1} weight=9;
        server 127.0.0.1:{port_v2} weight=1;
        keepalive 256;
        # Same per-connection request limit as the upstreams (the default, 1000, would make
        # nginx reconnect to the upstream every 1000 requests).
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port}{listen} backlog=4096;
{ssl}        location / {{
{forward}
        }}
    }}
{status}}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return prefix, path


def haproxy_maxconn(want=10000):
    """HAProxy refuses to start when maxconn*2 + a few descriptors exceed RLIMIT_NOFILE (a
    container may cap it at 20000 and forbid raising it). Any value far above the 256
    connections used here measures the same, so step down just enough."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return min(want, (limit - 100) // 2)


def write_haproxy_conf(tmp, port, port_v1, port_v2, mode="plain", tls=None, tls_resume=False,
                       stats_socket=None):
    """mode "tls": `bind ... ssl crt` (certificate and key in one file), TLS 1.2 at least,
    without tickets and session cache unless tls_resume; "h2c": h2 (prior knowledge) on the
    bind and the servers. stats_socket: a stats socket there (CumConns: connections
    accepted)."""
    bind = srv = glob = ""
    if stats_socket:
        glob += f"\n    stats socket {stats_socket} mode 600 level user"
    if mode == "tls":
        bind = f" ssl crt {tls.combined} ssl-min-ver TLSv1.2"
        if not tls_resume:
            bind += " no-tls-tickets"
            glob += "\n    tune.ssl.cachesize 0"
    elif mode == "h2c":
        bind = srv = " proto h2"
    conf = f"""global
    nbthread 1
    maxconn {haproxy_maxconn()}{glob}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 30s
    timeout client 30s
    timeout server 30s
    timeout http-request 30s
    timeout http-keep-alive 30s

frontend fe
    bind 127.0.0.1:{port}{bind}
    default_backend be

backend be
    balance roundrobin
    server v1 127.0.0.1:{port_v1} weight 9{srv}
    server v2 127.0.0.1:{port_v2} weight 1{srv}
"""
    path = os.path.join(tmp, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(conf)
    return path


def canary_extra_proxy_keys(extra):
    """>>> CANARY_EXTRA: extra keys for canary-proxy's [proxy] table, verbatim. <<<

    CANARY_EXTRA='workers = 1' adds `workers = 1`; several keys go on separate lines. When
    CANARY_EXTRA is unset or empty nothing is added.
    """
    lines = [ln.strip() for ln in extra.splitlines() if ln.strip()]
    if not lines:
        return ""
    return ("# ---- extra [proxy] keys from $CANARY_EXTRA ----\n" + "\n".join(lines)
            + "\n# ---- end of $CANARY_EXTRA ----\n")


# --rollout: canary's plan. Step 10 keeps the 90/10 split of the other contestants; the
# approval gate before 100 and a step_time far longer than any benchmark keep it from
# advancing, so it stays `running` at step 0 for the whole run (the analysis still runs every
# interval, as in production). Without [rollout] a backend has no meter at all.
ROLLOUT_STEPS = (10, 100)
ROLLOUT_TOML = """
[rollout]
baseline = "v1"
canary = "v2"
steps = [10, 100]
approve = [100]
step_time = "24h"

[rollout.analysis]
interval = "5s"
on_inconclusive = "hold"
"""
ROLLOUT_ACTIVE = ("running", "waiting_approval")


def write_canary_conf(tmp, port, admin_port, port_v1, port_v2, extra, name="canary.toml",
                      rollout=False, port_v3=None, mirror="", tls=None, h2c=False):
    """canary's config; canary@base gets the same one (name canary-base.toml), other ports.
    rollout: append ROLLOUT_TOML (only canary, with --rollout). port_v3: a third backend
    "v3" of weight 0 (--mirror-slow, both builds). mirror: append a [mirror] section with
    this backend and the defaults otherwise (only canary, with --mirror / --mirror-slow).
    tls (--tls): a [proxy.tls] table with its certificate and key. h2c (--h2c): the backends
    get protocol = "h2c"."""
    tls_table = ""
    if tls is not None:
        tls_table = f"""
[proxy.tls]
cert = "{tls.cert}"
key = "{tls.key}"
"""
    protocol = 'protocol = "h2c"\n' if h2c else ""
    conf = f"""[proxy]
listen = "127.0.0.1:{port}"
request_timeout = "30s"
{canary_extra_proxy_keys(extra)}{tls_table}
[admin]
listen = "127.0.0.1:{admin_port}"

[[backend]]
name = "v1"
urls = ["http://127.0.0.1:{port_v1}"]
weight = 90
{protocol}
[[backend]]
name = "v2"
urls = ["http://127.0.0.1:{port_v2}"]
weight = 10
{protocol}"""
    if port_v3 is not None:
        conf += f"""
[[backend]]
name = "v3"
urls = ["http://127.0.0.1:{port_v3}"]
weight = 0
"""
    if rollout:
        conf += ROLLOUT_TOML
    if mirror:
        conf += f"""
[mirror]
backend = "{mirror}"
"""
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(conf)
    return path


# --mirror-slow: the mirror backend's upstream. Reads each request head (and a body of known
# length), answers 200 with a small body only after DELAY seconds, keeps the connection.
SLOW_UPSTREAM_PY = """\
import asyncio, sys

PORT, DELAY = int(sys.argv[1]), float(sys.argv[2])
BODY = b"hello from v3\\n"
HEAD = (b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: "
        + str(len(BODY)).encode() + b"\\r\\n\\r\\n")


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            for line in head.split(b"\\r\\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and int(value):
                    await reader.readexactly(int(value))
            await asyncio.sleep(DELAY)
            writer.write(HEAD if head.startswith(b"HEAD ") else HEAD + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            ValueError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", PORT, backlog=1024)
    async with server:
        await server.serve_forever()


asyncio.run(main())
"""


def write_slow_upstream(tmp):
    path = os.path.join(tmp, "slow_upstream.py")
    with open(path, "w") as f:
        f.write(SLOW_UPSTREAM_PY)
    return path


@dataclass
class TlsFiles:
    """--tls: the certificate every proxy serves, its key, and both in one file (HAProxy)."""
    cert: str
    key: str
    combined: str


def make_certificate(tmp):
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1, made once per run."""
    d = os.path.join(tmp, "tls")
    os.makedirs(d)
    files = TlsFiles(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"),
                     os.path.join(d, "combined.pem"))
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", files.key, "-out", files.cert,
            "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"openssl req failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    with open(files.combined, "w") as out:
        for path in (files.cert, files.key):
            with open(path) as f:
                out.write(f.read())
    return files


# ---------------------------------------------------------------------------------------------
# Starting the fleet
# ---------------------------------------------------------------------------------------------

@dataclass
class Fleet:
    tmp: str
    ports: dict  # v1, v2, canary, admin, nginx, haproxy (+ canary@base, admin@base; status,
    #              nginx-status with --tls/--h2c)
    procs: dict = field(default_factory=dict)  # name -> Popen
    canary_conf: str = ""
    tls: TlsFiles = None  # --tls
    resumed: dict = field(default_factory=dict)  # --tls: proxy -> resumed a TLS session
    haproxy_sock: str = ""  # --tls, --h2c: HAProxy's stats socket


def is_canary(proxy):
    """canary or canary@base: a canary-proxy binary (x-canary-backend, admin API, memory)."""
    return proxy == "canary" or proxy.startswith("canary@")


def admin_key(proxy):
    """Key of a canary-proxy binary's admin port in Fleet.ports: admin, admin@base."""
    return "admin" + proxy[len("canary"):]


def canary_bin(settings, proxy):
    return settings.baseline if proxy == BASE else CANARY_BIN


def build_canary(settings):
    if settings.build:
        cmd = ["cargo", "build", "--release", "--bin", "canary-proxy"]
        log(f"building: {' '.join(cmd)}  (waits if another build holds the lock)")
        rc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr).returncode
        if rc != 0:
            raise RuntimeError(f"cargo build failed (exit {rc}); fix it or rerun with "
                               "--no-build to measure the existing binary")
    if not os.access(CANARY_BIN, os.X_OK):
        raise RuntimeError(f"{CANARY_BIN} missing; run cargo build --release")
    if settings.baseline and not os.access(settings.baseline, os.X_OK):
        raise RuntimeError(f"--baseline {settings.baseline} missing or not executable")


def start_canary(settings, procs, fleet, proxy):
    """Starts canary (target/release/canary-proxy) or canary@base (--baseline) on the proxy
    core with the generated config, after `canary-proxy check` accepted it."""
    binary, tmp, ports = canary_bin(settings, proxy), fleet.tmp, fleet.ports
    suffix = proxy[len("canary"):].replace("@", "-")  # "" or "-base"
    conf = write_canary_conf(tmp, ports[proxy], ports[admin_key(proxy)], ports["v1"],
                             ports["v2"], settings.canary_extra, f"canary{suffix}.toml",
                             rollout=settings.rollout and proxy == "canary",
                             port_v3=ports.get("v3"),
                             mirror=settings.mirror if proxy == "canary" else "",
                             tls=fleet.tls, h2c=settings.mode == "h2c")
    if proxy == "canary":
        fleet.canary_conf = conf
    check = subprocess.run([binary, "check", "--config", conf], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"{proxy} ({binary}) check rejected the generated config:\n"
                           f"{check.stdout}{check.stderr}")
    env = dict(os.environ, RUST_LOG="warn")
    logf = os.path.join(tmp, f"canary{suffix}.log")
    fleet.procs[proxy] = procs.start(proxy, ["taskset", "-c", str(settings.proxy_cpu), binary,
                                             "--config", conf], logf, env=env)
    name = "canary-proxy" if proxy == "canary" else proxy
    wait_listening(ports[proxy], fleet.procs[proxy], name, logf)
    wait_listening(ports[admin_key(proxy)], fleet.procs[proxy], f"{name} admin", logf)


def start_fleet(settings, procs, tmp):
    names = ["v1", "v2", "canary", "admin", "nginx", "haproxy"]
    if BASE in settings.proxies:
        names += [BASE, admin_key(BASE)]
    if settings.mirror == "v3":
        names.append("v3")
    if settings.mode != "plain":
        names.append("nginx-status")  # the nginx proxy's stub_status (accepted connections)
    if settings.mode == "h2c":
        names.append("status")  # the upstream's stub_status: v1 and v2 speak h2c only
    ports = dict(zip(names, free_ports(len(names))))
    ports.setdefault("status", ports["v1"])
    fleet = Fleet(tmp=tmp, ports=ports)
    if settings.mode == "tls":
        fleet.tls = make_certificate(tmp)
    if settings.mode != "plain":
        fleet.haproxy_sock = os.path.join(tmp, "haproxy.sock")
    pin_load = ["taskset", "-c", str(settings.load_cpu)]
    pin_proxy = ["taskset", "-c", str(settings.proxy_cpu)]

    prefix, conf = write_upstream_conf(tmp, ports["v1"], ports["v2"],
                                       ports["status"] if settings.mode == "h2c" else None)
    logf = os.path.join(prefix, "stdout.log")
    fleet.procs["upstream"] = procs.start("upstream", pin_load + ["nginx", "-p", prefix, "-c",
                                          conf], logf)
    wait_listening(ports["v1"], fleet.procs["upstream"], "upstream nginx", logf)
    wait_listening(ports["v2"], fleet.procs["upstream"], "upstream nginx", logf)
    wait_listening(ports["status"], fleet.procs["upstream"], "upstream nginx", logf)
    if "v3" in ports:
        script = write_slow_upstream(tmp)
        logf = os.path.join(tmp, "slow-upstream.log")
        fleet.procs["slow"] = procs.start("slow upstream", pin_load + [
            sys.executable, script, str(ports["v3"]), str(SLOW_UPSTREAM_DELAY_S)], logf)
        wait_listening(ports["v3"], fleet.procs["slow"], "slow upstream (v3)", logf)

    for proxy in settings.proxies:
        if is_canary(proxy):
            start_canary(settings, procs, fleet, proxy)

    if "nginx" in settings.proxies:
        prefix, conf = write_nginx_proxy_conf(tmp, ports["nginx"], ports["v1"], ports["v2"],
                                              settings.mode, fleet.tls, settings.tls_resume,
                                              ports.get("nginx-status"))
        logf = os.path.join(prefix, "stdout.log")
        fleet.procs["nginx"] = procs.start("nginx", pin_proxy + ["nginx", "-p", prefix, "-c",
                                           conf], logf)
        wait_listening(ports["nginx"], fleet.procs["nginx"], "nginx proxy", logf)
        if "nginx-status" in ports:
            wait_listening(ports["nginx-status"], fleet.procs["nginx"], "nginx proxy status",
                           logf)

    if "haproxy" in settings.proxies:
        conf = write_haproxy_conf(tmp, ports["haproxy"], ports["v1"], ports["v2"],
                                  settings.mode, fleet.tls, settings.tls_resume,
                                  fleet.haproxy_sock)
        logf = os.path.join(tmp, "haproxy.log")
        fleet.procs["haproxy"] = procs.start("haproxy", pin_proxy + ["haproxy", "-db", "-f",
                                             conf], logf)
        wait_listening(ports["haproxy"], fleet.procs["haproxy"], "haproxy", logf)
    return fleet


# ---------------------------------------------------------------------------------------------
# CPU and memory accounting from /proc
# ---------------------------------------------------------------------------------------------

def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                if int(rest[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError):
                pass
    return kids


def proxy_pids(fleet, name):
    """canary: its pid; nginx (proxy or upstream): master + workers; haproxy: its pid
    (nbthread 1, no master)."""
    pid = fleet.procs[name].pid
    return [pid] + children_of(pid) if name in ("nginx", "upstream") else [pid]


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        total += int(rest[11]) + int(rest[12])  # fields 14 utime, 15 stime
    return total / CLK_TCK


def core_times(cpu):
    """(busy, total) jiffies of one core from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                total = sum(v[:8])  # guest time is already counted in user
                return total - idle, total
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def all_process_cpu():
    """{pid: (comm, session id, cpu seconds)} of every process, to name outside load."""
    snap = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        rest = text.rsplit(")", 1)[1].split()
        snap[int(entry)] = (comm, int(rest[3]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return snap


def outside_load(before, after, own_sessions, wall, min_share=0.05):
    """Processes not started by this script that used more than min_share of a core."""
    found = []
    for pid, (comm, sid, cpu) in after.items():
        if sid in own_sessions or pid == os.getpid():
            continue
        used = cpu - before.get(pid, (comm, sid, 0.0))[2]
        if used > min_share * wall:
            found.append((used / wall, f"{comm} (pid {pid})"))
    return ", ".join(f"{name} {share:.0%}" for share, name in sorted(found, reverse=True)[:4])


def memory_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def upstream_counters(fleet):
    """(accepted connections, requests) of the upstream nginx, minus this status request."""
    _, _, body = request(fleet.ports["status"], path="/nginx_status")
    nums = body.decode().splitlines()[2].split()
    return int(nums[0]) - 1, int(nums[2]) - 1


# ---------------------------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out):
    def find(pattern, default=None):
        m = re.search(pattern, out, re.M)
        if m is None:
            if default is None:
                raise RuntimeError(f"wrk output lacks {pattern!r}:\n{out}")
            return default
        return m
    res = {
        "rps": float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        "p50": to_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        "p99": to_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        "requests": int(find(r"^\s+(\d+) requests in").group(1)),
        "non2xx": 0,
        "socket_errors": 0,
    }
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
        res["socket_detail"] = m.group(0)
    return res


def write_post_lua(tmp):
    path = os.path.join(tmp, "post.lua")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n'
                f'wrk.body = string.rep("x", {POST_BODY_BYTES})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


def run_wrk(settings, procs, url, conns, duration, lua=None, close=False):
    """close: every request with Connection: close, so wrk opens a new connection for each."""
    argv = ["taskset", "-c", str(settings.load_cpu), "wrk", "-t1", f"-c{conns}",
            f"-d{duration}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if lua:
        argv += ["-s", lua]
    argv.append(url)
    rc, out, err = procs.run(argv, timeout=duration + 30)
    if rc != 0:
        raise RuntimeError(f"wrk failed ({rc}): {' '.join(argv)}\n{out}{err}")
    return parse_wrk(out)


# ---------------------------------------------------------------------------------------------
# h2load (--h2c)
# ---------------------------------------------------------------------------------------------

def percentile(sorted_values, q):
    """The q-quantile (0..1) of sorted values, nearest rank (as wrk reports them)."""
    i = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def parse_h2load(out, log_path):
    """h2load's summary plus p50/p99 from its per-request log (start µs, status, µs until the
    end of the response; status -1 for a failed stream)."""
    def find(pattern):
        m = re.search(pattern, out, re.M)
        if m is None:
            raise RuntimeError(f"h2load output lacks {pattern!r}:\n{out}")
        return m
    if find(r"^Application protocol: (\S+)").group(1) != "h2c":
        raise RuntimeError(f"h2load did not speak h2c:\n{out}")
    m = find(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) "
             r"failed, (\d+) errored, (\d+) timeout")
    done, failed, errored, timeout = (int(m.group(i)) for i in (3, 5, 6, 7))
    codes = find(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    times = []
    with open(log_path) as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] != "-1":
                times.append(int(cols[2]))
    if not times:
        raise RuntimeError(f"h2load logged no completed request:\n{out}")
    times.sort()
    res = {
        "rps": float(find(r"^finished in [\d.]+m?s, ([\d.]+) req/s").group(1)),
        "p50": percentile(times, 0.50) / 1e3,
        "p99": percentile(times, 0.99) / 1e3,
        "requests": done,
        "non2xx": sum(int(codes.group(i)) for i in (2, 3, 4)),
        "socket_errors": failed + errored + timeout,
    }
    if res["socket_errors"]:
        res["socket_detail"] = f"h2load: failed {failed}, errored {errored}, timeout {timeout}"
    return res


def run_h2load(settings, procs, url, conns, streams, duration, log_path):
    """h2load, h2c with prior knowledge, conns connections with streams streams each, for
    duration seconds; its per-request log goes to log_path (overwritten)."""
    argv = ["taskset", "-c", str(settings.load_cpu), "h2load", "-t1", f"-c{conns}",
            f"-m{streams}", f"-D{duration}", f"--log-file={log_path}", url]
    if os.path.exists(log_path):
        os.remove(log_path)
    rc, out, err = procs.run(argv, timeout=duration + 30)
    if rc != 0:
        raise RuntimeError(f"h2load failed ({rc}): {' '.join(argv)}\n{out}{err}")
    return parse_h2load(out, log_path)


# ---------------------------------------------------------------------------------------------
# openssl s_time (--tls, tls-full)
# ---------------------------------------------------------------------------------------------

def run_s_time(settings, procs, port, clients, duration):
    """clients `openssl s_time -new` processes at once, each making connections one after
    another for duration seconds, each connection a new TLS session (a full handshake,
    whatever the server offers) with one HTTP/1.0 GET / (the server closes). No latencies;
    every process must have read a whole small answer per connection."""
    argv = ["taskset", "-c", str(settings.load_cpu), "openssl", "s_time", "-connect",
            f"127.0.0.1:{port}", "-new", "-time", str(duration), "-www", "/"]
    conns, nbytes = 0, 0
    for rc, out, err in procs.run_many([argv] * clients, timeout=duration + 30):
        m = re.search(r"^(\d+) connections in [\d.]+s; .*bytes read (\d+)$", out, re.M)
        if rc != 0 or m is None:
            raise RuntimeError(f"openssl s_time failed ({rc}): {' '.join(argv)}\n"
                               f"{out[-1000:]}{err[-1000:]}")
        conns += int(m.group(1))
        nbytes += int(m.group(2))
    per_conn = nbytes / max(conns, 1)
    if per_conn < len("HTTP/1.1 200 OK\r\n\r\nhello from v1\n"):
        raise RuntimeError(f"openssl s_time read {per_conn:.0f} bytes per connection: no "
                           f"whole answers from :{port}")
    # rps: filled in by measure() from its own wall time (s_time prints whole seconds only).
    return {"rps": 0.0, "p50": None, "p99": None, "requests": conns, "non2xx": 0,
            "socket_errors": 0, "bytes_per_conn": per_conn}


# ---------------------------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    key: str
    title: str
    path: str
    conns: int
    post: bool = False
    close: bool = False  # Connection: close on every request: a new connection for each
    streams: int = 0  # h2load's concurrent streams per connection (--h2c); 0: wrk
    s_time: bool = False  # conns openssl s_time -new processes instead of wrk (--tls)


SCENARIOS = [
    Scenario("get64", "small GET, 64 connections", "/", 64),
    Scenario("get16", "small GET, 16 connections", "/", 16),
    Scenario("get256", "small GET, 256 connections", "/", 256),
    Scenario("get16k", "16 KiB GET, 64 connections", "/16k", 64),
    Scenario("post4k", "4 KiB POST, 64 connections", "/post", 64, post=True),
]
TLS_SCENARIOS = [  # --tls
    Scenario("tls-get64", "TLS: small GET over kept-alive TLS connections, 64 connections",
             "/", 64),
    Scenario("tls-handshake", "TLS handshakes: a new TLS connection per small GET "
             "(Connection: close), 64 connections", "/", 64, close=True),
    Scenario("tls-full", "TLS full handshakes: 16 openssl s_time -new clients, a new session "
             "per connection, one HTTP/1.0 GET each", "/", 16, close=True, s_time=True),
]
H2C_SCENARIOS = [  # --h2c
    Scenario("h2c-get", "h2c to h2c: small GET, 16 connections × 16 streams (h2load)", "/", 16,
             streams=16),
]
MODE_SCENARIOS = {"plain": SCENARIOS, "tls": TLS_SCENARIOS, "h2c": H2C_SCENARIOS}
MEMORY_AFTER = ("get64", "tls-get64", "h2c-get")  # canary-proxy's RSS is read after these


def counters(settings, pids, upstream_pids):
    """Everything read before and after a run; the upstream's stub_status is read first and
    last so those requests stay outside the CPU window."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
    return {
        "t": time.monotonic(),
        "cpu": cpu_seconds(pids),
        "load_side": cpu_seconds(upstream_pids) + own.ru_utime + own.ru_stime
        + kids.ru_utime + kids.ru_stime,
        "proxy_core": core_times(settings.proxy_cpu),
        "load_core": core_times(settings.load_cpu),
        "all": all_process_cpu(),
    }


def busy_share(before, after):
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def measure(settings, procs, fleet, proxy, sc, duration, lua):
    pids, up_pids = proxy_pids(fleet, proxy), proxy_pids(fleet, "upstream")
    if "slow" in fleet.procs:
        up_pids.append(fleet.procs["slow"].pid)  # --mirror-slow's upstream: load side too
    scheme = "https" if settings.mode == "tls" else "http"
    url = f"{scheme}://127.0.0.1:{fleet.ports[proxy]}{sc.path}"
    # canary's mirror counts, read outside the CPU window like the upstream's stub_status.
    mirroring = settings.mirror and proxy == "canary"
    # --tls, --h2c: connections accepted in the run, netns-wide and by the proxy's own count
    # (read outside the CPU window too; the netns count just around the load generator).
    counting = settings.mode != "plain"
    m0 = mirror_counts(fleet) if mirroring else None
    up0 = upstream_counters(fleet)
    a0 = proxy_accepts(fleet, proxy) if counting else None
    p0 = tcp_passive_opens() if counting else 0
    c0 = counters(settings, pids, up_pids)
    if sc.streams:
        res = run_h2load(settings, procs, url, sc.conns, sc.streams, duration,
                         os.path.join(fleet.tmp, "h2load-requests.log"))
    elif sc.s_time:
        res = run_s_time(settings, procs, fleet.ports[proxy], sc.conns, duration)
    else:
        res = run_wrk(settings, procs, url, sc.conns, duration, lua if sc.post else None,
                      close=sc.close)
    c1 = counters(settings, pids, up_pids)
    p1 = tcp_passive_opens() if counting else 0
    up1 = upstream_counters(fleet)
    a1 = proxy_accepts(fleet, proxy) if counting else None
    m1 = mirror_counts(fleet) if mirroring else None

    wall, cpu = c1["t"] - c0["t"], c1["cpu"] - c0["cpu"]
    if sc.s_time:
        res["rps"] = res["requests"] / wall
    res["cpu_us_per_req"] = cpu / max(res["requests"], 1) * 1e6
    res["util"] = cpu / wall
    res["proxy_core"] = busy_share(c0["proxy_core"], c1["proxy_core"])
    res["load_core"] = busy_share(c0["load_core"], c1["load_core"])
    # Busy time on both cores not used by the proxy, the upstream, wrk or this script:
    # someone else's load (a build, tests, another benchmark), in shares of one core.
    load_side = (c1["load_side"] - c0["load_side"]) / wall
    res["outside_cpu"] = max(0.0, res["proxy_core"] + res["load_core"] - res["util"]
                             - load_side)
    res["foreign"] = res["outside_cpu"] > OUTSIDE_LOAD
    res["outside"] = outside_load(c0["all"], c1["all"], procs.sessions(), wall)
    # upstream_counters() subtracts its own request; the first read's connection and
    # request fall inside this window, hence the -1.
    res["up_conns"] = up1[0] - up0[0] - 1
    res["up_reqs"] = up1[1] - up0[1] - 1
    # --mirror: the copies to v2 reach the upstream nginx too (sent ones: copied, errors,
    # timeouts); up to max_in_flight of them may be running when the counts are read.
    res["up_copies"], slack = 0, sc.conns * max(sc.streams, 1)
    if mirroring:
        res["mirror"] = {key: m1[key] - m0[key] for key in MIRROR_KEYS}
        if settings.mirror == "v2":
            res["up_copies"] = sum(res["mirror"][k] for k in ("copied", "errors", "timeouts"))
            slack += MIRROR_MAX_IN_FLIGHT
    # Requests in flight when wrk stops reach the upstream but are not counted by wrk.
    res["up_mismatch"] = (abs(res["up_reqs"] - res["requests"] - res["up_copies"])
                          > slack + 0.01 * res["requests"])
    if counting:
        # New client connections: everything accepted in the namespace during the run but the
        # upstream's (the proxy's new upstream connections).
        res["conns"] = p1 - p0 - res["up_conns"]
        res["own_conns"] = None if a0 is None else a1 - a0 - 1
        if sc.close:
            res["conns_per_req"] = res["conns"] / max(res["requests"], 1)
            # Fewer connections than requests: the client did not reconnect. More: wrk's
            # connections still open when it stops (and the one it makes first to try the
            # address) were accepted with no request counted; beyond those, only the proxy's
            # own count can tell (the namespace's also has other programs' connections).
            own = res["own_conns"]
            count = res["conns"] if own is None else own
            res["conns_off"] = (
                count < res["requests"] * (1 - CONNS_PER_REQ_SLACK)
                or (own is not None and own - res["requests"]
                    > sc.conns + 1 + CONNS_PER_REQ_SLACK * res["requests"]))
    if is_canary(proxy):
        res["mem"] = memory_kib(fleet.procs[proxy].pid)
    return res


def measured_run(settings, procs, fleet, proxy, sc, lua, gate, label):
    """One counted run; with --wait-idle, waits for idle cores first and repeats a run that
    outside load disturbed."""
    attempt = 0
    while True:
        gate.wait(2)
        res = measure(settings, procs, fleet, proxy, sc, settings.duration, lua)
        log(f"  {label}{describe(res)}")
        if not gate.may_rerun(res, attempt):
            return res
        attempt += 1
        log("    (outside load: run repeated)")


def describe(res):
    flags = ""
    if res["non2xx"] or res["socket_errors"]:
        flags += f"  ERRORS non2xx={res['non2xx']} socket={res['socket_errors']}"
    if res["foreign"]:
        flags += f"  OUTSIDE LOAD {res['outside_cpu']:.0%} of a core"
    if res["outside"]:
        flags += f"  (outside processes: {res['outside']})"
    if res["up_mismatch"]:
        flags += (f"  UPSTREAM requests {res['up_reqs']} != wrk {res['requests']}"
                  + (f" + {res['up_copies']} copies" if res["up_copies"] else ""))
    if "conns" in res:
        flags += f"  new conns {res['conns']}"
        if res["own_conns"] is not None:
            flags += f" (proxy's count {res['own_conns']})"
        if "conns_per_req" in res:
            flags += f" = {res['conns_per_req']:.3f}/req"
            if res["conns_off"]:
                flags += "  NOT ONE CONNECTION PER REQUEST"
    if "mirror" in res:
        m = res["mirror"]
        flags += (f"  mirror +{m['copied']} copied +{m['dropped']} dropped"
                  + "".join(f" +{m[k]} {k}" for k in ("errors", "timeouts") if m[k])
                  + ("  NO COPIES" if not m["copied"] else ""))
    if res["p50"] is None:  # openssl s_time: no latencies
        latency = f"{'':>32}"
    else:
        latency = f"  p50 {res['p50']:6.2f} ms  p99 {res['p99']:6.2f} ms"
    return (f"{res['rps']:>9.0f} req/s{latency}  "
            f"{res['cpu_us_per_req']:5.1f} µs/req  util {res['util']:4.0%}  "
            f"load core {res['load_core']:4.0%}  up conns {res['up_conns']}{flags}")


# ---------------------------------------------------------------------------------------------
# Weight swaps through the admin API
# ---------------------------------------------------------------------------------------------

class Swapper(threading.Thread):
    """POSTs /admin/weight?v2=20 and ?v2=10 alternately, 10 times a second, until stopped."""

    def __init__(self, admin_port, rate_hz=10):
        super().__init__(daemon=True)
        self.port, self.period = admin_port, 1.0 / rate_hz
        self.stop_event = threading.Event()
        self.done = self.ok = 0
        self.failures = []

    def run(self):
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            value = 20 if self.done % 2 == 0 else 10
            try:
                status, _, body = request(self.port, "POST", f"/admin/weight?v2={value}")
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{status} {body[:100]!r}")
            except OSError as e:
                self.failures.append(repr(e))
            self.done += 1
            next_at += self.period
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self):
        self.stop_event.set()
        self.join(timeout=10)


def reset_weights(admin_port):
    status, _, body = request(admin_port, "POST", "/admin/weight?v2=10")
    if status != 200:
        raise RuntimeError(f"resetting weights: {status} {body!r}")


# ---------------------------------------------------------------------------------------------
# --rollout: canary runs a progressive rollout
# ---------------------------------------------------------------------------------------------

def rollout_status(admin_port):
    status, _, body = request(admin_port, path="/admin/rollout")
    if status != 200:
        raise RuntimeError(f"GET /admin/rollout -> {status} {body[:300]!r}")
    return json.loads(body)


def start_rollout(fleet, other=f"{BASE} runs the same config without [rollout] (no meters, no "
                                "analysis)"):
    """POST /admin/rollout/start on canary's admin port; it must answer 200 and then be
    running (or waiting for approval) at 10%. Returns the report's line; other: what it is
    compared with."""
    port = fleet.ports[admin_key("canary")]
    status, _, body = request(port, "POST", "/admin/rollout/start")
    if status != 200:
        raise RuntimeError(f"canary: POST /admin/rollout/start -> {status} {body[:300]!r}")
    st = rollout_status(port)
    if st.get("state") not in ROLLOUT_ACTIVE or st.get("canary_percent") != ROLLOUT_STEPS[0]:
        raise RuntimeError(f"canary: after POST /admin/rollout/start the rollout is "
                           f"{st.get('state')!r} at {st.get('canary_percent')!r}%, expected "
                           f"running at {ROLLOUT_STEPS[0]}%")
    line = (f"- rollout: canary runs a progressive rollout v1 -> v2 (steps "
            f"{list(ROLLOUT_STEPS)}, approve [100], step_time 24h, analysis every 5 s), "
            f"started through POST /admin/rollout/start (200; then {st['state']}, step "
            f"{st['step']}, canary {st['canary_percent']}%); {other}")
    log(line[2:])
    return line


def rollout_end_line(fleet):
    """After the last run: the rollout must still be under way at 10%, with both versions
    counted by its meters. Returns the report's line (⚠ when it is not)."""
    st = rollout_status(fleet.ports[admin_key("canary")])
    counted = (f"its meters counted {st['baseline']['requests']:,} v1 and "
               f"{st['canary']['requests']:,} v2 requests at this step, verdicts errors "
               f"{st['verdict']['errors']}, latency {st['verdict']['latency']}")
    events = [h["event"] for h in st.get("history", [])]
    if st["state"] in ROLLOUT_ACTIVE and st["canary_percent"] == ROLLOUT_STEPS[0] \
            and st["canary"]["requests"] > 0 and st["baseline"]["requests"] > 0:
        line = (f"- rollout after the last run: still {st['state']} at step {st['step']} "
                f"(canary {st['canary_percent']}%); {counted}; transitions: "
                f"{', '.join(events)}")
    else:
        line = (f"- ⚠ rollout after the last run: {st['state']} at canary "
                f"{st['canary_percent']}% ({counted}; transitions: {', '.join(events)}): "
                "the runs after it left `running` did not measure a running rollout")
    log(line[2:])
    return line


# ---------------------------------------------------------------------------------------------
# --mirror, --mirror-slow: canary copies requests to a mirror backend
# ---------------------------------------------------------------------------------------------

# The counts the report shows, in its order (GET /admin/mirror has skipped_* too).
MIRROR_KEYS = ("copied", "dropped", "errors", "timeouts", "compared", "identical", "different")


def mirror_status(fleet):
    port = fleet.ports[admin_key("canary")]
    status, _, body = request(port, path="/admin/mirror")
    if status != 200:
        raise RuntimeError(f"canary: GET /admin/mirror -> {status} {body[:300]!r}")
    return json.loads(body)


def mirror_counts(fleet):
    return mirror_status(fleet)["counts"]


def mirror_settled(settings, fleet):
    """Counts once the copies still running have finished: unchanged for longer than a copy
    takes (its upstream's delay with --mirror-slow), at most the mirror's timeout (5 s) + 1."""
    window = (SLOW_UPSTREAM_DELAY_S if settings.mirror == "v3" else 0.0) + 0.5
    deadline = time.monotonic() + 6.0
    counts, since = mirror_counts(fleet), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < window:
        time.sleep(0.25)
        now = mirror_counts(fleet)
        if now != counts:
            counts, since = now, time.monotonic()
    return counts


def format_mirror_counts(counts):
    return ", ".join(f"{key} {counts[key]:,}" for key in MIRROR_KEYS)


def start_mirror(settings, fleet):
    """After the sanity checks: canary's GET /admin/mirror must show the configured mirror;
    its counts (the sanity checks' copies) are reset once those copies have finished, so the
    end line covers the warm-ups and the measured runs. Returns the report's line."""
    st = mirror_status(fleet)
    cfg = st.get("config") or {}
    if cfg.get("backend") != settings.mirror:
        raise RuntimeError(f"canary: GET /admin/mirror shows config {cfg or None!r}, expected "
                           f"backend {settings.mirror!r}")
    sanity = mirror_settled(settings, fleet)
    port = fleet.ports[admin_key("canary")]
    status, _, body = request(port, "POST", "/admin/mirror/reset")
    if status != 200:
        raise RuntimeError(f"canary: POST /admin/mirror/reset -> {status} {body[:300]!r}")
    target = ("v2 (the upstream nginx's other port)" if settings.mirror == "v2" else
              f"v3 (weight 0; a Python upstream answering after {SLOW_UPSTREAM_DELAY_S:g} s, "
              f"also declared in {BASE}'s config)")
    line = (f"- mirror: canary copies the GETs served by v1 to {target}: [mirror] backend = "
            f"\"{settings.mirror}\", the rest at the defaults (percent {cfg['percent']:g}, "
            f"methods {', '.join(cfg['methods'])}, max_in_flight {cfg['max_in_flight']}, "
            f"timeout {cfg['timeout']}, compare {str(cfg['compare']).lower()}); {BASE} runs "
            f"the same config without [mirror]. The sanity checks made {sanity['copied']:,} "
            "copies (dropped "
            f"{sanity['dropped']:,}); counts reset after them")
    log(line[2:])
    return line


def mirror_end_line(settings, fleet):
    """After the last run, once the last copies have finished: canary's mirror counts since
    the reset. ⚠ when no copy was made: then nothing measured mirroring."""
    counts = mirror_settled(settings, fleet)
    if counts["copied"] > 0:
        line = f"- mirror after the last run (GET /admin/mirror): {format_mirror_counts(counts)}"
    else:
        line = (f"- ⚠ mirror after the last run (GET /admin/mirror): "
                f"{format_mirror_counts(counts)}: no copy was made, so the runs did not "
                "measure mirroring")
    log(line[2:])
    return line


def mirror_rounds_line(runs):
    """canary's mirror counts summed over a scenario's measured rounds (⚠ when a round
    copied nothing)."""
    total = {key: sum(r["mirror"][key] for r in runs) for key in MIRROR_KEYS}
    idle = [i for i, r in enumerate(runs, 1) if r["mirror"]["copied"] == 0]
    line = f"canary's mirror in these {len(runs)} round(s): {format_mirror_counts(total)}"
    if idle:
        line += f" ⚠ no copy made in round(s) {', '.join(map(str, idle))}"
    return line


# ---------------------------------------------------------------------------------------------
# Sanity checks
# ---------------------------------------------------------------------------------------------

def sanity_checks(settings, procs, fleet, lua):
    """Each proxy answers 200 (canary with x-canary-backend), reaches both v1 and v2 (by
    body), and serves /16k and POST /post; the upstream keeps POST connections alive. --tls:
    the same over TLS, checking the certificate (no upstream POST check: no POST scenario);
    --h2c: see sanity_checks_h2c."""
    if settings.mode == "h2c":
        return sanity_checks_h2c(settings, fleet)
    notes = []
    for proxy in settings.proxies:
        port = fleet.ports[proxy]
        status, headers, body = request(port, tls=fleet.tls)
        if status != 200:
            raise RuntimeError(f"{proxy}: GET / -> {status} {body!r}")
        if is_canary(proxy):
            backend = headers.get("x-canary-backend")
            if backend not in ("v1", "v2") or body != f"hello from {backend}\n".encode():
                raise RuntimeError(f"{proxy}: x-canary-backend={backend!r}, body {body!r}")
        conn = client_connection(port, fleet.tls)
        hits = {"v1": 0, "v2": 0}
        n = 400
        for _ in range(n):
            status, _, body = request(port, conn=conn)
            text = body.decode(errors="replace")
            m = re.fullmatch(r"hello from (v[12])\n", text)
            if status != 200 or not m:
                raise RuntimeError(f"{proxy}: GET / -> {status} {text!r}")
            hits[m.group(1)] += 1
        status, _, body = request(port, path="/16k", conn=conn)
        if status != 200 or len(body) != 16384 or not body.startswith(b"16k from v"):
            raise RuntimeError(f"{proxy}: GET /16k -> {status}, {len(body)} bytes")
        status, _, body = request(port, "POST", "/post", body=b"x" * POST_BODY_BYTES,
                                  conn=conn)
        if status != 200 or not body.startswith(b"posted to v"):
            raise RuntimeError(f"{proxy}: POST /post -> {status} {body!r}")
        conn.close()
        split_check(proxy, hits, n)
        notes.append(f"{proxy}: v1 {hits['v1']}, v2 {hits['v2']} of {n}"
                     + (" over TLS" if fleet.tls else ""))
    if settings.mode == "tls":
        return notes
    # POST keeps the upstream connection alive: 4 connections, about a thousand POSTs.
    c0, r0 = upstream_counters(fleet)
    res = run_wrk(settings, procs, f"http://127.0.0.1:{fleet.ports['v1']}/post", 4, 1, lua)
    c1, r1 = upstream_counters(fleet)
    opened = c1 - c0 - 1
    if res["non2xx"] or res["socket_errors"] or opened > 8 or res["requests"] < 100:
        raise RuntimeError(f"upstream POST keep-alive check: {res['requests']} requests, "
                           f"{opened} connections opened, non2xx {res['non2xx']}, socket "
                           f"errors {res['socket_errors']}")
    notes.append(f"upstream POST /post: {res['requests']} requests over {opened} connections "
                 "(keep-alive holds with a 4 KiB body)")
    return notes


def split_check(proxy, hits, n):
    """Both upstreams used, v2 at about 10%."""
    if hits["v1"] == 0 or hits["v2"] == 0:
        raise RuntimeError(f"{proxy}: over {n} requests v1={hits['v1']} v2={hits['v2']}; "
                           "both upstreams must be used")
    share = hits["v2"] / n
    if not 0.03 <= share <= 0.20:
        raise RuntimeError(f"{proxy}: v2 got {share:.0%} of {n} requests, expected ~10%")


def sanity_checks_h2c(settings, fleet):
    """--h2c: each proxy answers GET / over h2c with 200 (canary with x-canary-backend) and
    reaches both v1 and v2 over 400 GETs on one h2c connection (nghttp); the upstream refuses
    HTTP/1.1, so each of those answers came from it over h2c."""
    notes = []
    for proxy in settings.proxies:
        port = fleet.ports[proxy]
        status, headers, body = nghttp_head(port)
        if status != 200 or not body.startswith("hello from v"):
            raise RuntimeError(f"{proxy}: h2c GET / -> {status} {body!r}")
        if is_canary(proxy):
            backend = headers.get("x-canary-backend")
            if backend not in ("v1", "v2") or body != f"hello from {backend}\n":
                raise RuntimeError(f"{proxy}: x-canary-backend={backend!r}, body {body!r}")
        n = 400
        text = nghttp_get(port, n)
        hits = {v: len(re.findall(rf"^hello from {v}$", text, re.M)) for v in ("v1", "v2")}
        if hits["v1"] + hits["v2"] != n:
            raise RuntimeError(f"{proxy}: {n} h2c GETs gave {hits['v1']} v1 and {hits['v2']} "
                               f"v2 answers: {text[:300]!r}")
        split_check(proxy, hits, n)
        notes.append(f"{proxy}: v1 {hits['v1']}, v2 {hits['v2']} of {n} over h2c")
    try:
        status, _, body = request(fleet.ports["v1"])
        refused = f"{status} {body[:60]!r}"
    except (http.client.HTTPException, OSError) as e:
        refused = ""
        notes.append(f"upstream v1 answers HTTP/1.1 with {type(e).__name__} (h2c only): the "
                     "proxies' 200s came over h2c")
    if refused:
        raise RuntimeError(f"upstream v1 answered HTTP/1.1 ({refused}): it must be h2c only")
    return notes


def tls_probes(settings, fleet):
    """--tls, after the sanity checks: for each proxy what an OpenSSL client negotiates, and
    whether it resumes a session (Python's ssl offering the session of a first connection
    on a second one). Sets fleet.resumed; returns the report's lines."""
    lines = []
    for proxy in settings.proxies:
        port = fleet.ports[proxy]
        negotiated = openssl_negotiates(port)
        version, resumed = tls_resumes(port, fleet.tls)
        fleet.resumed[proxy] = resumed
        mark = "" if resumed == settings.tls_resume else " ⚠"
        lines.append(f"- TLS with {proxy}: openssl s_client negotiates {negotiated}; session "
                     f"resumption ({version}): "
                     + ("resumed (wrk's reconnections resume too: cheaper handshakes)"
                        if resumed else "not resumed (every handshake is a full one)")
                     + mark)
    kind = ("resumed handshakes (nginx: shared session cache and tickets; HAProxy: its "
            "defaults)" if settings.tls_resume else
            "full handshakes (nginx: ssl_session_cache off, ssl_session_tickets off; HAProxy: "
            "no-tls-tickets, tune.ssl.cachesize 0)")
    lines.append(f"- TLS handshakes meant to be measured: {kind}; canary-proxy as configured "
                 "([proxy.tls] cert and key only). ⚠ above: that proxy's handshakes were not "
                 "of that kind")
    for line in lines:
        log(line[2:])
    return lines


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def cmd_output(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        return (p.stdout + p.stderr).strip()
    except OSError:
        return "?"


def cores_busy(settings, seconds):
    cores = (settings.proxy_cpu, settings.load_cpu)
    before = [core_times(c) for c in cores]
    time.sleep(seconds)
    return [busy_share(b, core_times(c)) for b, c in zip(before, cores)]


class IdleGate:
    """With --wait-idle: waits (within one budget for the whole benchmark) until both cores
    are idle, and says whether a disturbed run may be repeated. Another benchmark or a build
    running at the same time distorts every number."""

    SAMPLE_S = 0.5

    def __init__(self, settings):
        self.settings = settings
        self.remaining = float(settings.wait_idle)
        self.waited = 0.0
        self.reruns = 0

    def wait(self, quiet_s):
        quiet = 0.0
        while self.remaining > 0 and quiet < quiet_s:
            busy = cores_busy(self.settings, self.SAMPLE_S)
            quiet = quiet + self.SAMPLE_S if max(busy) < OUTSIDE_LOAD else 0.0
            self.remaining -= self.SAMPLE_S
            self.waited += self.SAMPLE_S

    def may_rerun(self, res, attempt, max_reruns=2):
        if res["foreign"] and self.remaining > 0 and attempt < max_reruns:
            self.reruns += 1
            return True
        return False

    def start_line(self):
        """Waits for 5 quiet seconds (with --wait-idle), then reports how busy the cores are."""
        if self.remaining > 0:
            log(f"waiting up to {self.remaining:.0f} s for both cores to be idle")
        self.wait(5)
        busy = cores_busy(self.settings, 1.0)
        line = f"- before start: proxy core {busy[0]:.0%} busy, load core {busy[1]:.0%} busy"
        if self.waited:
            line += f" (after waiting {self.waited:.0f} s for idle cores)"
        if max(busy) > OUTSIDE_LOAD:
            line += " ⚠ not idle: results will be noisy"
        return line

    def summary_line(self):
        if not self.settings.wait_idle:
            return ""
        return (f"--wait-idle {self.settings.wait_idle}: waited {self.waited:.0f} s in all for "
                f"idle cores; {self.reruns} run(s) repeated because of outside load.")


def git_commit(cwd):
    """Short HEAD of the checkout at cwd (+ a note on uncommitted changes), or None."""
    try:
        p = subprocess.run(["git", "-C", cwd, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    except OSError:
        return None
    if p.returncode != 0:
        return None
    commit = p.stdout.strip()
    dirty = cmd_output(["git", "-C", cwd, "status", "--porcelain", "--untracked-files=no"])
    if dirty:
        commit += f" + uncommitted changes in {len(dirty.splitlines())} file(s)"
    return commit


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def built_at(path):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))


def baseline_info(settings):
    """The canary@base line: path, the commit of the checkout it was built in (when it sits
    at CHECKOUT/target/PROFILE/canary-proxy), build time, and whether it equals canary."""
    path = settings.baseline
    parts = path.split(os.sep)
    commit = None
    if len(parts) >= 4 and parts[-3] == "target":
        commit = git_commit(os.sep.join(parts[:-3]) or os.sep)
    line = (f"- {BASE}: {path}; " + (f"checkout at commit {commit}" if commit else
                                     "commit unknown (not in CHECKOUT/target/…)")
            + f"; binary built {built_at(path)}")
    if file_sha256(path) == file_sha256(CANARY_BIN):
        if settings.rollout:
            line += (" — the same binary as canary (identical bytes): canary/canary@base "
                     "ratios show the cost of the running rollout (and the noise)")
        elif settings.mirror:
            line += (" — the same binary as canary (identical bytes): canary/canary@base "
                     "ratios show the cost of mirroring (and the noise)")
        else:
            line += (" ⚠ the same binary as canary (identical bytes): canary/canary@base "
                     "ratios show only the noise")
    return line


def machine_info(settings):
    commit = git_commit(ROOT) or "?"
    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    wrk_v = cmd_output(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0]
    tools = [cmd_output(["nginx", "-v"])]
    if "haproxy" in settings.proxies:
        tools.append(cmd_output(["haproxy", "-v"]).splitlines()[0])
    if settings.mode == "tls":
        tools.append(cmd_output(["openssl", "version"]))
    elif settings.mode == "h2c":
        wrk_v = cmd_output(["h2load", "--version"])  # h2c: h2load is the load generator
    info = [
        f"- machine: {os.cpu_count()} cores (nproc {cmd_output(['nproc'])}), {cpu_model}, "
        f"kernel {platform.release()}",
        f"- {'; '.join(tools)}; {wrk_v}",
    ]
    if "canary" in settings.proxies:
        info.append(f"- canary-proxy: commit {commit}; binary built {built_at(CANARY_BIN)}; "
                    f"CANARY_EXTRA={settings.canary_extra!r}")
    if settings.baseline:
        info.append(baseline_info(settings))
    if settings.proxies != PROXIES:
        info.append(f"- contestants: {', '.join(settings.proxies)}"
                    + (f" (canary and {BASE} trade places in even rounds)"
                       if BASE in settings.proxies else ""))
    generator = "h2load (-t1)" if settings.mode == "h2c" else "wrk (-t1)"
    info.append(
        f"- proxy under test on core {settings.proxy_cpu}; upstream nginx + {generator} on core "
        f"{settings.load_cpu}; {settings.duration} s per run, {settings.rounds} round(s), "
        f"1 s warm-up per proxy per scenario")
    if settings.mode == "tls":
        info.append("- TLS: every proxy serves the same self-signed ECDSA P-256 certificate "
                    "(made with openssl for this run); TLS 1.2 and 1.3 allowed; upstreams plain "
                    "HTTP/1.1")
    elif settings.mode == "h2c":
        info.append("- h2c: h2load to the proxy with prior knowledge; the upstream nginx speaks "
                    "h2c only (listen ... http2); canary: backends with protocol = \"h2c\"; "
                    "HAProxy: proto h2 on bind and servers; nginx: grpc_pass grpc:// (one "
                    "stream per upstream connection: no multiplexing upstream)")
    if "haproxy" in settings.proxies and haproxy_maxconn() < 10000:
        info.append(f"- HAProxy maxconn {haproxy_maxconn()} instead of 10000: the file "
                    f"descriptor limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    return info


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def flagged(runs):
    s = ""
    if any(r["non2xx"] or r["socket_errors"] or r["up_mismatch"] or r.get("conns_off")
           for r in runs):
        s += " ⚠"
    if any(r["foreign"] for r in runs):
        s += " †"
    return s


def fmt_rps(runs):
    return f"{med(runs, 'rps'):,.0f}" + flagged(runs)


def table_head(vs_nginx=True):
    """The scenario table's head; the "vs nginx" column only when nginx ran."""
    head = ("| proxy | req/s | p50 | p99 | CPU µs/req | core util | proxy core busy "
            "| load core busy | outside CPU | upstream conns opened |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if vs_nginx:
        head += " vs nginx (req/s; p99) |"
        rule += "---|"
    return head + "\n" + rule


def table_row(label, runs, ref=None, vs_nginx=True):
    row = (f"| {label} | {fmt_rps(runs)} | {med(runs, 'p50'):.2f} ms | "
           f"{med(runs, 'p99'):.2f} ms | {med(runs, 'cpu_us_per_req'):.1f} | "
           f"{med(runs, 'util'):.0%} | {med(runs, 'proxy_core'):.0%} | "
           f"{med(runs, 'load_core'):.0%} | {max(r['outside_cpu'] for r in runs):.0%} | "
           f"{max(r['up_conns'] for r in runs)} |")
    if vs_nginx:
        vs = "—"
        if ref is not None:
            vs = (f"{med(runs, 'rps') / med(ref, 'rps'):.2f}×; "
                  f"{med(runs, 'p99') / med(ref, 'p99'):.2f}×")
        row += f" {vs} |"
    return row


def error_notes(label, runs):
    notes = []
    for i, r in enumerate(runs, 1):
        if r["non2xx"] or r["socket_errors"]:
            notes.append(f"  - ⚠ {label} round {i}: non-2xx {r['non2xx']}, "
                         f"{r.get('socket_detail', 'socket errors 0')}")
        if r["up_mismatch"]:
            notes.append(f"  - ⚠ {label} round {i}: upstream served {r['up_reqs']} requests, "
                         f"wrk counted {r['requests']}"
                         + (f" (+ {r['up_copies']} mirror copies)" if r["up_copies"] else ""))
        if r.get("conns_off"):
            own = "" if r["own_conns"] is None else f", by the proxy's count {r['own_conns']}"
            notes.append(f"  - ⚠ {label} round {i}: {r['conns']} new connections accepted"
                         f"{own} for {r['requests']} requests: not one TLS handshake per "
                         "request")
        if r["foreign"]:
            notes.append(f"  - † {label} round {i}: processes not started by this benchmark "
                         f"used {r['outside_cpu']:.0%} of a core (a build, tests, another "
                         "benchmark?): not trustworthy"
                         + (f"; busiest: {r['outside']}" if r["outside"] else ""))
    if any(r["load_core"] >= LOAD_CORE_FULL for r in runs):
        notes.append(f"  - {label}: load core ≥{LOAD_CORE_FULL:.0%} busy in "
                     f"{sum(r['load_core'] >= LOAD_CORE_FULL for r in runs)} of {len(runs)} "
                     "round(s): wrk + upstream may be limiting this number")
    return notes


# canary vs canary@base: (key, label in the report)
BASE_KEYS = (("rps", "req/s"), ("p99", "p99"), ("cpu_us_per_req", "CPU µs/req"))


def base_ratio(new, old, key):
    """canary/canary@base for one key: ratio of the medians, and "(lo–hi)" of the per-round
    ratios (the two builds ran back to back in each round) when there are several rounds."""
    if new[0][key] is None:  # latencies of openssl s_time runs
        return "—"
    text = f"{med(new, key) / med(old, key):.2f}×"
    per_round = [n[key] / o[key] for n, o in zip(new, old) if o[key]]
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}–{max(per_round):.2f})"
    return text


def base_line(new, old):
    return (f"canary/{BASE}: " + ", ".join(f"{label} {base_ratio(new, old, key)}"
                                           for key, label in BASE_KEYS)
            + flagged(new + old))


BASE_SUMMARY_HEAD = (
    f"| scenario | CPU µs/req canary | CPU µs/req {BASE} | ratio CPU µs/req | ratio req/s "
    "| ratio p99 | marks |\n|---|---:|---:|---:|---:|---:|---|")


def base_summary_row(title, new, old):
    return (f"| {title} | {med(new, 'cpu_us_per_req'):.1f} | {med(old, 'cpu_us_per_req'):.1f} | "
            + " | ".join(base_ratio(new, old, key) for key in
                         ("cpu_us_per_req", "rps", "p99"))
            + f" |{flagged(new + old)} |")


def base_summary_markdown(rows, rounds, rollout=False, mirror=""):
    spread = (" In parentheses the lowest and highest per-round ratio: the two builds ran "
              "back to back in every round (canary first in odd rounds, canary@base first in "
              "even ones), so a spread that includes 1.00 means no measurable difference."
              if rounds > 1 else " One round only: no spread; use more rounds (an even number "
              "keeps the order balanced) to judge a small difference.")
    head = [f"## canary vs {BASE} (same run)", ""]
    if rollout:
        head = [f"## canary with a running rollout vs {BASE} without (same run)", "",
                f"canary ran the rollout (v1 -> v2 at 90/10, state running); {BASE} had no "
                "[rollout]. A ratio above 1.00× in CPU µs/req is what the rollout costs.", ""]
    if mirror:
        head = [f"## canary mirroring to {mirror} vs {BASE} without (same run)", "",
                f"canary copied the GETs served by v1 to {mirror} and compared the answers; "
                f"{BASE} had no [mirror]. A ratio above 1.00× in CPU µs/req is what mirroring "
                "costs; the client must not pay in req/s or p99.", ""]
    return (head + [BASE_SUMMARY_HEAD] + rows
            + ["", f"ratio = canary/{BASE}, of the medians over rounds: CPU µs/req and p99 "
               f"below 1.00× and req/s above 1.00× mean canary does better than {BASE}."
               + spread
               + " ⚠/† as in the tables below.", ""])


# --tls, --h2c: canary vs nginx and HAProxy, per scenario (key, label in the report)
VS_KEYS = (("cpu_us_per_req", "CPU µs/req"), ("rps", "req/s"), ("p99", "p99"))

VS_SUMMARY_HEAD = (
    "| scenario | vs | CPU µs/req canary | CPU µs/req other | ratio CPU µs/req | ratio req/s "
    "| ratio p99 | marks |\n|---|---|---:|---:|---:|---:|---:|---|")


def vs_summary_row(key, other, c, o, note=""):
    """One row of the summary: scenario key, the other proxy, CPU µs/req of both, ratios;
    note: the kinds of handshake when they differ (⚠)."""
    marks = (flagged(c + o) + (f" {note}" if note else "")).strip()
    return (f"| {key} | {other} | {med(c, 'cpu_us_per_req'):.1f} | "
            f"{med(o, 'cpu_us_per_req'):.1f} | "
            + " | ".join(base_ratio(c, o, k) for k, _ in VS_KEYS)
            + f" | {marks} |")


def vs_summary_markdown(settings, rows):
    spread = (" In parentheses the lowest and highest per-round ratio (the proxies ran back to "
              "back in every round)." if settings.rounds > 1 else
              " One round only: no spread.")
    what = ("TLS terminated by every proxy with the same certificate" if settings.mode == "tls"
            else "h2c from the client and to the upstreams")
    return ["## canary vs nginx and HAProxy (same run)", "",
            f"{what}. Scenarios by key (titles below). Ratios are canary/other of the medians "
            "over rounds: CPU µs/req and p99 "
            "below 1.00× and req/s above 1.00× mean canary does better." + spread
            + " ⚠/† as in the tables below.", "", VS_SUMMARY_HEAD] + rows + [""]


def proto_table_head(sc, vs_nginx):
    """--tls, --h2c: the scenario table, with the client connections accepted; for
    tls-handshake per request and the kind of handshake."""
    rate, cpu = ("handshakes/s", "CPU µs/handshake") if sc.close else ("req/s", "CPU µs/req")
    head = (f"| proxy | {rate} | p50 | p99 | {cpu} | core util | proxy core busy "
            "| load core busy | outside CPU | upstream conns opened | client conns accepted |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if sc.close:
        head += " accepted conns/request | proxy's own count/request | handshakes |"
        rule += "---:|---:|---|"
    if vs_nginx:
        head += f" vs nginx ({rate}; p99; CPU) |"
        rule += "---|"
    return head + "\n" + rule


def fmt_ms(runs, key):
    return "—" if runs[0][key] is None else f"{med(runs, key):.2f} ms"


def proto_table_row(sc, label, runs, ref, vs_nginx, resumed):
    row = (f"| {label} | {fmt_rps(runs)} | {fmt_ms(runs, 'p50')} | "
           f"{fmt_ms(runs, 'p99')} | {med(runs, 'cpu_us_per_req'):.1f} | "
           f"{med(runs, 'util'):.0%} | {med(runs, 'proxy_core'):.0%} | "
           f"{med(runs, 'load_core'):.0%} | {max(r['outside_cpu'] for r in runs):.0%} | "
           f"{max(r['up_conns'] for r in runs)} | {med(runs, 'conns'):,.0f} |")
    if sc.close:
        own = [r["own_conns"] / max(r["requests"], 1) for r in runs
               if r["own_conns"] is not None]
        kind = "?" if resumed is None else "resumed" if resumed else "full"
        if sc.s_time:
            kind = "full (s_time -new)"
        row += (f" {med(runs, 'conns_per_req'):.3f} | "
                + (f"{statistics.median(own):.3f}" if own else "—") + f" | {kind} |")
    if vs_nginx:
        vs = "—"
        if ref is not None:
            vs = "; ".join("—" if runs[0][key] is None else
                           f"{med(runs, key) / med(ref, key):.2f}×"
                           for key in ("rps", "p99", "cpu_us_per_req"))
        row += f" {vs} |"
    return row


def scenario_markdown(settings, sc, results, base_rows, vs_rows=None, resumed=None):
    """vs_rows (--tls, --h2c): collects the summary's canary vs nginx and HAProxy rows;
    resumed: {proxy: whether it resumed a TLS session} (--tls)."""
    if settings.mode != "plain":
        return proto_markdown(settings, sc, results, base_rows, vs_rows, resumed or {})
    proxies = settings.proxies
    vs_nginx = "nginx" in proxies
    lines = [f"### {sc.title}", "", table_head(vs_nginx)]
    for proxy in proxies:
        label = proxy
        if proxy == "canary" and settings.rollout:
            label = f"{proxy} (rollout running)"
        elif proxy == "canary" and settings.mirror:
            label = f"{proxy} (mirror → {settings.mirror})"
        lines.append(table_row(label, results[proxy],
                               None if proxy == "nginx" or not vs_nginx else results["nginx"],
                               vs_nginx))
    c = results["canary"]
    ratios = []
    if vs_nginx:
        n = results["nginx"]
        ratios.append(f"canary/nginx req/s = {med(c, 'rps') / med(n, 'rps'):.2f}×, "
                      f"p99 = {med(c, 'p99') / med(n, 'p99'):.2f}×")
    if "haproxy" in proxies:
        h = results["haproxy"]
        ratios.append(f"canary/haproxy = {med(c, 'rps') / med(h, 'rps'):.2f}×")
    lines.append("")
    if ratios:
        lines.append("; ".join(ratios))
    if BASE in proxies:
        lines += ([""] if ratios else []) + [base_line(c, results[BASE])]
        base_rows.append(base_summary_row(sc.title, c, results[BASE]))
    if settings.mirror:
        lines += ["", mirror_rounds_line(c)]
    for proxy in proxies:
        lines += error_notes(proxy, results[proxy])
    return lines + [""]


def proto_markdown(settings, sc, results, base_rows, vs_rows, resumed):
    """--tls, --h2c: a scenario's table and its canary/nginx and canary/haproxy ratios."""
    proxies = settings.proxies
    vs_nginx = "nginx" in proxies
    lines = [f"### {sc.title}", "", proto_table_head(sc, vs_nginx)]
    for proxy in proxies:
        ref = None if proxy == "nginx" or not vs_nginx else results["nginx"]
        lines.append(proto_table_row(sc, proxy, results[proxy], ref, vs_nginx,
                                     resumed.get(proxy)))
    lines.append("")
    if "canary" in results:
        c = results["canary"]
        for other in ("nginx", "haproxy"):
            if other in results:
                lines += [f"canary/{other}: " + ", ".join(
                    f"{label} {base_ratio(c, results[other], key)}" for key, label in VS_KEYS)
                    + flagged(c + results[other]), ""]
                note = ""
                if sc.close and not sc.s_time and resumed.get("canary") != resumed.get(other):
                    def kind(p):
                        return "resumed" if resumed.get(p) else "full"
                    note = f"⚠ handshakes: canary {kind('canary')}, {other} {kind(other)}"
                vs_rows.append(vs_summary_row(sc.key, other, c, results[other], note))
        if BASE in proxies:
            lines += [base_line(c, results[BASE]), ""]
            base_rows.append(base_summary_row(sc.title, c, results[BASE]))
    if (sc.close and not sc.s_time
            and any(resumed.get(p, False) != settings.tls_resume for p in proxies)):
        lines += [f"⚠ not every proxy did {'resumed' if settings.tls_resume else 'full'} "
                  "handshakes (column handshakes, from the resumption probe): their handshakes "
                  "per second and CPU per handshake are not comparable", ""]
    notes = []
    for proxy in proxies:
        notes += error_notes(proxy, results[proxy])
    return lines + notes + ([""] if notes else [])


def swap_markdown(settings, results, base_rows):
    """results: {build: (without, with_, swappers)} for canary (and canary@base)."""
    vs_nginx = "nginx" in settings.proxies
    alone = "alone" if len(results) == 1 else f"alone ({' and '.join(results)})"
    lines = [f"### table swaps: canary-proxy {alone}, small GET, 64 connections", "",
             table_head(vs_nginx)]
    for build, (without, with_, _) in results.items():
        lines += [table_row(f"{build}, no swaps", without, vs_nginx=vs_nginx),
                  table_row(f"{build}, 10 swaps/s", with_, vs_nginx=vs_nginx)]
    lines.append("")
    notes = []
    for build, (without, with_, swaps) in results.items():
        ratio = med(with_, "rps") / med(without, "rps")
        p99 = med(with_, "p99") / med(without, "p99")
        done = sum(s.done for s in swaps)
        ok = sum(s.ok for s in swaps)
        who = "" if len(results) == 1 else f"{build}: "
        lines.append(f"{who}with swaps / without = {ratio:.2f}× req/s (p99 {p99:.2f}×); "
                     f"{done} weight changes POSTed, {ok} answered 200")
        if len(results) > 1:
            lines.append("")
        for s in swaps:
            for failure in s.failures[:5]:
                notes.append(f"  - ⚠ {build}: swap failed: {failure}")
        prefix = "" if len(results) == 1 else f"{build} "
        notes += (error_notes(f"{prefix}no swaps", without)
                  + error_notes(f"{prefix}swaps", with_))
    if BASE in results:
        (c0, c1, _), (b0, b1, _) = results["canary"], results[BASE]
        lines += [f"no swaps: {base_line(c0, b0)}", "",
                  f"10 swaps/s: {base_line(c1, b1)}"]
        base_rows += [base_summary_row("table swaps: no swaps", c0, b0),
                      base_summary_row("table swaps: 10 swaps/s", c1, b1)]
    if settings.mirror:
        c0, c1, _ = results["canary"]
        lines += ["", f"no swaps: {mirror_rounds_line(c0)}", "",
                  f"10 swaps/s: {mirror_rounds_line(c1)}"]
    return lines + notes + [""]


def rss_markdown(mem_points):
    """mem_points: {build: [(label, {VmRSS, VmHWM})]}, one line per canary-proxy binary."""
    lines = []
    for build, points in mem_points.items():
        parts = [f"{label}: VmRSS {m['VmRSS'] / 1024:.1f} MiB, VmHWM {m['VmHWM'] / 1024:.1f} "
                 "MiB" for label, m in points]
        name = "canary-proxy" if build == "canary" else build
        lines += [f"{name} memory — " + "; ".join(parts), ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

LEGEND = (
    "Columns: req/s, p50, p99 are medians over rounds; CPU µs/req = utime+stime of the "
    "proxy's processes per completed request; core util = the proxy's CPU seconds per wall "
    "second (100% = its whole core); proxy/load core busy = non-idle share of that core from "
    "/proc/stat (includes softirq/network work); outside CPU = busy time on both cores not "
    "used by the proxy, the upstream, wrk or this script, in shares of one core (max over "
    "rounds); upstream conns opened = new connections the upstream accepted during a run "
    "(max over rounds). ⚠ = errors or an upstream request count that does not match wrk's; "
    f"† = outside CPU above {OUTSIDE_LOAD:.0%} of a core in some round (numbers not "
    "trustworthy).")


LEGEND_PROTO = (
    "--tls, --h2c: client conns accepted = TCP connections accepted in this network namespace "
    "during the run (/proc/net/snmp PassiveOpens) less the upstream's, median over rounds "
    "(other programs' connections would count too); tls-handshake: handshakes/s is wrk's "
    "requests/s, each request on a new connection (accepted conns/request ≈ 1.000 shows it; "
    "proxy's own count = nginx's stub_status accepts, HAProxy's CumConns), CPU µs/handshake "
    "the proxy's CPU per request (handshake, request and close); handshakes = full or resumed "
    "by the resumption probe. vs nginx = ratios of the medians.")


def round_order(proxies, rnd):
    """Run order in round rnd: canary and canary@base trade places in even rounds, so
    neither build always runs first; everything else keeps its place."""
    order = list(proxies)
    if rnd % 2 == 0 and BASE in order:
        i, j = order.index("canary"), order.index(BASE)
        order[i], order[j] = order[j], order[i]
    return order


def run_proxy_scenarios(settings, procs, fleet, lua, gate, mem_points, base_rows, vs_rows):
    """Scenarios 1-5 (--tls, --h2c: theirs): per scenario a warm-up per proxy, then rounds of
    canary, (canary@base,) nginx, haproxy back to back."""
    md = []
    width = max(8, max(len(p) for p in settings.proxies))  # log column, as before --baseline
    for sc in MODE_SCENARIOS[settings.mode]:
        if sc.key not in settings.scenarios:
            continue
        log(f"== {sc.title}")
        results = {p: [] for p in settings.proxies}
        for proxy in settings.proxies:
            measure(settings, procs, fleet, proxy, sc, WARMUP_S, lua)
        for rnd in range(1, settings.rounds + 1):
            for proxy in round_order(settings.proxies, rnd):
                results[proxy].append(measured_run(settings, procs, fleet, proxy, sc, lua,
                                                   gate, f"round {rnd} {proxy:<{width}}"))
        md += scenario_markdown(settings, sc, results, base_rows, vs_rows, fleet.resumed)
        if sc.key in MEMORY_AFTER:
            when = "after small GET/64" if sc.key == "get64" else f"after {sc.key}"
            for proxy in settings.proxies:
                if is_canary(proxy):
                    mem_points[proxy].append((when, results[proxy][-1]["mem"]))
    return md


def swapped_run(settings, procs, fleet, build, sc, lua, gate, label):
    """One counted run of build with the admin API changing weights 10 times a second."""
    for attempt in range(3):
        gate.wait(2)
        swapper = Swapper(fleet.ports[admin_key(build)])
        swapper.start()
        try:
            res = measure(settings, procs, fleet, build, sc, settings.duration, lua)
        finally:
            swapper.stop()
        reset_weights(fleet.ports[admin_key(build)])
        log(f"  {label}{describe(res)}  ({swapper.ok}/{swapper.done} swaps OK)")
        if not gate.may_rerun(res, attempt):
            break
        log("    (outside load: run repeated)")
    return res, swapper


def run_swap_scenario(settings, procs, fleet, lua, gate, base_rows):
    """Scenario 6: canary-proxy alone, rounds of (no swaps, 10 weight changes per second);
    with --baseline canary@base too, next to canary: no swaps for both, then swaps for
    both."""
    builds = [p for p in settings.proxies if is_canary(p)]
    log("== table swaps (canary-proxy only)" if len(builds) == 1 else
        f"== table swaps ({' and '.join(builds)} only)")
    sc = Scenario("swaps", "small GET under weight swaps", "/", 64)
    for build in builds:
        measure(settings, procs, fleet, build, sc, WARMUP_S, lua)
    results = {b: ([], [], []) for b in builds}
    width = max(len(b) for b in builds)
    for rnd in range(1, settings.rounds + 1):
        order = round_order(builds, rnd)
        for build in order:
            who = "" if len(builds) == 1 else f"{build:<{width}} "
            results[build][0].append(measured_run(settings, procs, fleet, build, sc, lua, gate,
                                                  f"round {rnd} {who}no swaps "))
        for build in order:
            who = "" if len(builds) == 1 else f"{build:<{width}} "
            res, swapper = swapped_run(settings, procs, fleet, build, sc, lua, gate,
                                       f"round {rnd} {who}swaps    ")
            results[build][1].append(res)
            results[build][2].append(swapper)
    return swap_markdown(settings, results, base_rows)


def run_benchmark(settings, procs, tmp):
    t_build = time.monotonic()
    if "canary" in settings.proxies:
        build_canary(settings)
    build_s = time.monotonic() - t_build
    gate = IdleGate(settings)
    info = machine_info(settings) + [gate.start_line()]
    # The script itself (and the swap thread) stays off the proxy core.
    os.sched_setaffinity(0, {settings.load_cpu})
    t_start = time.monotonic()
    for line in info:
        log(line)
    fleet = start_fleet(settings, procs, tmp)
    log(f"started: upstream v1/v2 on :{fleet.ports['v1']}/:{fleet.ports['v2']}, "
        + (f"slow upstream v3 on :{fleet.ports['v3']}, " if "v3" in fleet.ports else "")
        + ", ".join(f"{p} :{fleet.ports[p]}"
                    + (f" (admin :{fleet.ports[admin_key(p)]})" if is_canary(p) else "")
                    for p in settings.proxies)
        + f"; temp dir {tmp}")
    lua = write_post_lua(tmp)
    if settings.rollout:
        info.append(start_rollout(fleet))  # before the checks: they see the rollout's split
    for note in sanity_checks(settings, procs, fleet, lua):
        log(f"sanity: {note}")
    if settings.mode == "tls":
        info += tls_probes(settings, fleet)
    if settings.mirror:
        info.append(start_mirror(settings, fleet))  # after the checks: counts from zero

    mem_points = {p: [] for p in settings.proxies if is_canary(p)}
    base_rows, vs_rows = [], []
    body = run_proxy_scenarios(settings, procs, fleet, lua, gate, mem_points, base_rows,
                               vs_rows)
    if "swaps" in settings.scenarios:
        body += run_swap_scenario(settings, procs, fleet, lua, gate, base_rows)
    if settings.rollout:
        info.append(rollout_end_line(fleet))
    if settings.mirror:
        info.append(mirror_end_line(settings, fleet))
    title = {"plain": "", "tls": ": TLS termination (--tls)", "h2c": ": h2c to h2c (--h2c)"}
    md = [f"# canary-proxy load benchmark{title[settings.mode]}", ""] + info + [""]
    if vs_rows:
        md += vs_summary_markdown(settings, vs_rows)
    if base_rows:
        md += base_summary_markdown(base_rows, settings.rounds, settings.rollout,
                                    settings.mirror)
    md += body
    for build in mem_points:
        mem_points[build].append(("at the end", memory_kib(fleet.procs[build].pid)))
    md += rss_markdown(mem_points)
    if gate.summary_line():
        md += [gate.summary_line(), ""]
    md += [LEGEND, ""] + ([LEGEND_PROTO, ""] if settings.mode != "plain" else []) + [
        f"Run time {time.monotonic() - t_start:.0f} s (plus {build_s:.0f} s "
           "in cargo build)."]
    return "\n".join(md) + "\n"


def main():
    settings = parse_settings()
    check_tools(settings)
    # SIGINT too: a shell starting this in the background would otherwise leave it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    raise_fd_limit()
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="canary-load-")
    keep = False
    try:
        report = run_benchmark(settings, procs, tmp)
        print(report, end="")
        os.makedirs(os.path.dirname(REPORT_PATH), exist_ok=True)
        with open(REPORT_PATH, "w") as f:
            f.write(report)
        log(f"report written to {REPORT_PATH}")
    except Interrupted as e:
        log(f"interrupted by {e}; stopping everything")
        sys.exit(130)
    except Exception as e:
        keep = True
        log(f"error: {e}")
        if not isinstance(e, RuntimeError):
            raise
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            log(f"logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
