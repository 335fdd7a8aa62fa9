#!/usr/bin/env python3
"""Instructions per request with and without a running rollout (or with and without [store]),
by callgrind (exact, unlike times on a shared machine).

What it measures
    One canary-proxy binary (default target/release/canary-proxy), run under
    `valgrind --tool=callgrind` twice per repeat: "without" = load.py's generated config (v1
    90, v2 10, no [rollout]); "with" = the same config plus load.py's [rollout] section
    (steps [10, 100], approve [100], step_time 24h, analysis every 5 s), started with
    POST /admin/rollout/start and checked to be running at 10% before and after the count.
    Per run: a warm-up with wrk, `callgrind_control -z` (counters to zero), a fixed wrk run
    (-t1, --conns connections, --duration seconds), `callgrind_control -d` (dump), then the
    proxy is stopped. The dump's total of user-space instructions (Ir, every thread of the
    process) divided by wrk's request count is "instructions per request".

    The rollout's analysis (every 5 s, on a blocking thread) is in the "with" total. Under
    callgrind the proxy serves some 10 times fewer requests per second than natively, so a
    cost paid per second weighs about 10 times more per request here than in the load
    benchmark. So callgrind keeps each thread apart (--separate-threads=yes) and the report
    gives, besides the whole process, the worker threads alone (the threads that ran
    Proxy::handle: the hot path, with the meters) and the other threads (control plane,
    analysis, state file) in instructions per second; analyses counted from
    canary_rollout_verdicts_total.

    --store: "with" is instead "store" = the same config plus a [store] table (no rollout)
    pointing at an etcd this script starts (one member on 127.0.0.1, free ports, data in the
    temp dir, on LOAD_CPU); every "store" run gets a prefix of its own, so the proxy seeds the
    document and watches it, and its link (thread canary-store) renews its lease every second.
    Before and after the count the proxy must show the store up with the table from etcd
    (/admin/routes). The hot path must not touch etcd: the worker threads' figure should be
    the same with and without; the link's own work is in "other threads". The report also
    counts, per run, the etcd client / store functions (etcd_client, tonic, control::store,
    StoreLink) that the worker threads' dumps name (must be 0) and the other threads' do.

    The upstream is load.py's nginx (v1 and v2 on two ports). The proxy runs on PROXY_CPU
    (default 0), wrk and the upstream on LOAD_CPU (default 1), as in load.py, so the proxy
    has the same number of worker threads (one per core it may use).

How to run
    python3 benches/instructions.py                 # 10 s runs, 2 repeats, GET /: ~2 min
    python3 benches/instructions.py --post          # 4 KiB POST instead of small GET
    python3 benches/instructions.py --store         # [store] (etcd) instead of a rollout
    python3 benches/instructions.py --binary PATH --duration 20 --repeat 3 --conns 64
    CANARY_EXTRA='sticky_cookie = "canary_uid"' python3 benches/instructions.py \
        --header 'Cookie: canary_uid=0123456789abcdef0123456789abcdef'   # a returning visitor

    Needs valgrind (callgrind_control, callgrind_annotate), nginx, wrk and taskset (and etcd
    with --store); installs nothing (exit 2 when one is missing). Builds nothing: build target/release/canary-proxy
    first (`cargo build --release --locked`). Everything it starts (nginx, valgrind with the
    proxy, wrk, etcd) runs in its own process group and is stopped at the end, also on Ctrl-C;
    dumps, configs and logs live in a temp dir that is removed (kept and printed on failure).
    The report goes to stdout and target/instructions.md (--store: target/instructions-store.md);
    progress to stderr.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing load.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (load.py beside this file: configs, processes, wrk, checks)
import replicas  # noqa: E402  (replicas.py beside this file: etcd, [store] table, its status)

REPORT_PATH = os.path.join(load.ROOT, "target", "instructions.md")
STORE_REPORT_PATH = os.path.join(load.ROOT, "target", "instructions-store.md")  # --store
VARIANTS = ("without", "with")  # no [rollout]; a started rollout
STORE_VARIANTS = ("without", "store")  # --store: no [store]; [store] with a running etcd
HOT_SYMBOL = b"canary_proxy::proxy::Proxy::handle"  # only worker threads run it


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=load.CANARY_BIN,
                   help="the canary-proxy binary (default target/release/canary-proxy)")
    p.add_argument("--duration", type=int, default=10, help="seconds per counted wrk run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of wrk before counting")
    p.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per variant; without/with alternate, each repeat swaps the order")
    p.add_argument("--post", action="store_true", help="4 KiB POST /post instead of GET /")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a header every GET carries (repeatable), e.g. a sticky cookie: "
                        "--header 'Cookie: canary_uid=0123456789abcdef0123456789abcdef'")
    p.add_argument("--store", action="store_true",
                   help="compare without / with a [store] table (an etcd started here) "
                        "instead of without / with a running rollout")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir with the callgrind dumps (for callgrind_annotate)")
    a = p.parse_args()
    a.binary = os.path.abspath(a.binary)
    if not (os.path.isfile(a.binary) and os.access(a.binary, os.X_OK)):
        p.error(f"{a.binary}: not an executable file (cargo build --release --locked first)")
    if a.post and a.header:
        p.error("--header is for GETs; --post sends its own script")
    if any(":" not in h for h in a.header):
        p.error("--header takes 'NAME: VALUE'")
    if a.duration < 1 or a.repeat < 1 or a.conns < 1 or a.warmup < 0:
        p.error("--duration, --repeat and --conns must be at least 1, --warmup at least 0")
    a.variants = STORE_VARIANTS if a.store else VARIANTS
    return a


def check_tools(args):
    tools = ("valgrind", "callgrind_control", "callgrind_annotate", "nginx", "wrk", "taskset")
    if args.store:
        tools += ("etcd",)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        print("needs: apt-get install valgrind nginx-light wrk"
              + (" etcd-server" if args.store else ""))
        sys.exit(2)


def settings_for(args):
    """The load.Settings fields load's helpers read (cores, CANARY_EXTRA)."""
    return load.Settings(scenarios=[], duration=args.duration, rounds=1,
                         proxy_cpu=int(os.environ.get("PROXY_CPU", 0)),
                         load_cpu=int(os.environ.get("LOAD_CPU", 1)),
                         canary_extra=os.environ.get("CANARY_EXTRA", ""), build=False,
                         wait_idle=0)


def callgrind_total(dump):
    """Ir of a callgrind dump: its `totals:` (or `summary:`) line, first event."""
    found = None
    with open(dump) as f:
        for line in f:
            m = re.match(r"(totals|summary):\s+(\d+)", line)
            if m:
                found = int(m.group(2))
                if m.group(1) == "totals":
                    break
    if found is None:
        raise RuntimeError(f"{dump}: no totals/summary line")
    return found


def runs_hot_path(dump):
    """Whether this thread's dump names Proxy::handle (callgrind writes a function's name in
    full the first time a file mentions it): a worker thread."""
    with open(dump, "rb") as f:
        return HOT_SYMBOL in f.read()


STORE_CODE = re.compile(rb"^c?fn=\(\d+\) (.*(?:etcd_client|tonic::|canary_proxy::control::(?:store|etcd)"
                        rb"|StoreLink).*)$", re.M)


def store_code(dump):
    """Names of etcd client / store functions a thread's dump mentions (callgrind names a
    function the first time the file refers to it: one it ran or called)."""
    with open(dump, "rb") as f:
        return {m.group(1).decode(errors="replace") for m in STORE_CODE.finditer(f.read())}


def metric(admin_port, name):
    _, _, body = load.request(admin_port, path="/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_dumps(run_dir, before, timeout=60.0):
    """The per-thread files callgrind_control -d wrote (callgrind.PID.1-NN), once no new one
    has appeared and none has grown for a second."""
    deadline = time.monotonic() + timeout
    seen, quiet = {}, 0.0
    while time.monotonic() < deadline:
        now = {f: os.path.getsize(os.path.join(run_dir, f))
               for f in set(os.listdir(run_dir)) - before if f.startswith("callgrind.")}
        quiet = quiet + 0.25 if now and now == seen else 0.0
        if quiet >= 1.0:
            return [os.path.join(run_dir, f) for f in sorted(now)]
        seen = now
        time.sleep(0.25)
    raise RuntimeError("callgrind_control -d wrote no dump")


def write_headers_lua(tmp, headers):
    """A wrk script adding `headers` ('NAME: VALUE') to every request; None without any."""
    if not headers:
        return None
    path = os.path.join(tmp, "headers.lua")
    with open(path, "w") as f:
        for header in headers:
            name, value = (part.strip() for part in header.split(":", 1))
            f.write(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n")
    return path


def one_run(args, settings, procs, fleet, variant, lua, index):
    """Starts the proxy under callgrind with or without a rollout (or [store]), counts one wrk
    run, stops it. Returns a dict of the figures."""
    tmp = fleet.tmp
    rollout = variant == "with"
    store = variant == "store"
    run_dir = os.path.join(tmp, f"run{index}-{variant}")
    os.makedirs(run_dir)
    ports = load.free_ports(2)
    fleet.ports["canary"], fleet.ports["admin"] = ports
    conf = load.write_canary_conf(run_dir, ports[0], ports[1], fleet.ports["v1"],
                                  fleet.ports["v2"], settings.canary_extra, "canary.toml",
                                  rollout=rollout)
    if store:
        with open(conf, "a") as f:
            f.write(replicas.store_toml(fleet.etcd_url, f"/canary-instr/run{index}",
                                        os.path.join(run_dir, "canary.snapshot.json")))
    check = subprocess.run([args.binary, "check", "--config", conf], capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"canary-proxy check rejected the config:\n{check.stdout}"
                           f"{check.stderr}")
    logf = os.path.join(run_dir, "proxy.log")
    argv = ["taskset", "-c", str(settings.proxy_cpu), "valgrind", "--tool=callgrind",
            "--separate-threads=yes", f"--callgrind-out-file={run_dir}/callgrind.%p",
            args.binary, "--config", conf]
    env = dict(os.environ, RUST_LOG="warn")
    proc = procs.start(f"callgrind {variant}", argv, logf, env=env)
    fleet.procs["canary"] = proc
    load.wait_listening(ports[0], proc, "canary-proxy under callgrind", logf, timeout=120)
    load.wait_listening(ports[1], proc, "canary-proxy admin under callgrind", logf,
                        timeout=60)
    store_line = ""
    try:
        if store:
            st = replicas.wait_store_up(ports[1], "canary-proxy under callgrind", timeout=120)
            load.log(f"  store up (source {st['source']}, prefix {st['prefix']})")
        if rollout:
            load.start_rollout(fleet, "the runs without use the same config without "
                                      "[rollout]")
        url = f"http://127.0.0.1:{ports[0]}{'/post' if args.post else '/'}"
        body = lua if args.post or args.header else None
        if args.warmup:
            load.run_wrk(settings, procs, url, args.conns, args.warmup, body)
        ticks0 = metric(ports[1], "canary_rollout_verdicts_total") / 2
        before = set(os.listdir(run_dir))
        ctl = subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True,
                             text=True)
        if ctl.returncode != 0:
            raise RuntimeError(f"callgrind_control -z failed: {ctl.stdout}{ctl.stderr}")
        up0 = load.upstream_counters(fleet)
        res = load.run_wrk(settings, procs, url, args.conns, args.duration, body)
        up1 = load.upstream_counters(fleet)
        ctl = subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True,
                             text=True)
        if ctl.returncode != 0:
            raise RuntimeError(f"callgrind_control -d failed: {ctl.stdout}{ctl.stderr}")
        dumps = wait_dumps(run_dir, before)
        ticks1 = metric(ports[1], "canary_rollout_verdicts_total") / 2
        end = load.rollout_end_line(fleet) if rollout else ""
        if store:
            st = replicas.store_status(ports[1])
            if not (st.get("up") and st.get("source") == "etcd"):
                raise RuntimeError(f"after the count the store is not up from etcd: {st}")
            _, headers, _ = load.request(ports[1], path="/admin/weight")
            store_line = f"up, {st['source']}, rev {headers.get('etag', '?').strip(chr(34))}"
    finally:
        procs._stop(proc)
    if res["non2xx"] or res["socket_errors"]:
        raise RuntimeError(f"{variant}: wrk saw errors: non-2xx {res['non2xx']}, "
                           f"{res.get('socket_detail', '')}")
    if end.startswith("- ⚠") and not args.header:
        # (With --header every request may go to one version: the ⚠ line stays in the
        # report, and the "without" runs are what such a measurement is for.)
        raise RuntimeError(f"the rollout did not stay under way: {end}")
    totals = [(callgrind_total(d), runs_hot_path(d)) for d in dumps]
    # --store: does any worker thread run etcd or store code? (It must not: the hot path
    # reads the table in force, and only the link's thread talks to etcd.)
    worker_store = set()
    other_store = set()
    for d, (_, hot) in zip(dumps, totals):
        (worker_store if hot else other_store).update(store_code(d))
    ir = sum(t for t, _ in totals)
    workers = sum(t for t, hot in totals if hot)
    if not workers:
        raise RuntimeError(f"no thread dump of {variant} names Proxy::handle: {dumps}")
    n = res["requests"]
    out = {
        "variant": variant,
        "requests": n,
        "rps": res["rps"],
        "upstream": up1[1] - up0[1] - 1,  # minus the first status read's own request
        "threads": len(totals),
        "worker_threads": sum(1 for _, hot in totals if hot),
        "ir": ir,
        "per_req": ir / n,
        "worker_per_req": workers / n,
        "other_per_s": (ir - workers) / args.duration,
        "ticks": ticks1 - ticks0,
        "store": store_line,
        "worker_store_code": sorted(worker_store),
        "other_store_code": len(other_store),
    }
    load.log(f"  {variant:<7} {n:>7} requests ({out['rps']:.0f}/s, upstream "
             f"{out['upstream']}): {ir:,} Ir = {out['per_req']:,.0f} per request; worker "
             f"thread(s) {out['worker_per_req']:,.0f} per request; other threads "
             f"{out['other_per_s']:,.0f} per s; "
             + (f"store: {store_line or 'none'}; etcd/store functions in worker threads "
                f"{len(worker_store)}, in other threads {len(other_store)}" if args.store
                else f"{out['ticks']:.0f} analyses"))
    if worker_store:
        load.log("    worker threads ran: " + "; ".join(sorted(worker_store)[:10]))
    return out


def report(args, runs):
    def med(variant, key):
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    wo_name, w_name = args.variants

    def ratio(key):
        w, wo = med(w_name, key), med(wo_name, key)
        return f"{w / wo:.4f} ({(w / wo - 1) * 100:+.2f}%)"

    def diff(key):
        return f"{med(w_name, key) - med(wo_name, key):+,.1f}"

    kind = "4 KiB POST /post" if args.post else "small GET /"
    if args.header:
        kind += " with " + ", ".join(f"`{h}`" for h in args.header)
    if args.store:
        what = "with and without [store] (replicas sharing a table through etcd)"
        setup = ("- store = the same config plus [store] (etcd on 127.0.0.1 started here, a "
                 "prefix per run, default lease_ttl and timeout; no rollout), the store up "
                 "with the table from etcd before and after the count; without = no [store]")
        other = "other threads = control plane, the store's link (lease renewal every second)"
        last_col = ("store after the count; etcd/store functions in worker threads, in "
                    "other threads")
    else:
        what = "with and without a running rollout"
        setup = ("- with = [rollout] v1 -> v2, steps [10, 100], approve [100], step_time 24h, "
                 "analysis every 5 s, started by POST /admin/rollout/start and still running "
                 "at 10% after the count; without = the same config without [rollout]")
        other = "other threads = control plane, the rollout's analysis and state file"
        last_col = "analyses"
    lines = [
        f"# canary-proxy: instructions per request {what}", "",
        f"- binary {args.binary} (built {load.built_at(args.binary)}; checkout "
        f"{load.git_commit(load.ROOT) or '?'})",
        f"- {kind}, wrk -t1 -c{args.conns}, {args.warmup} s warm-up then {args.duration} s "
        f"counted, {args.repeat} run(s) per variant (alternating); user-space instructions "
        "(Ir) under callgrind, divided by wrk's request count",
        setup,
        "- worker threads = the threads that ran Proxy::handle (the hot path, meters "
        f"included); {other}", "",
        "| run | variant | requests (upstream) | req/s | Ir per request, whole process "
        f"| Ir per request, worker threads | other threads, Ir per s | {last_col} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        last = (f"{r['store'] or '-'}; {len(r['worker_store_code'])}, "
                f"{r['other_store_code']}") if args.store else f"{r['ticks']:.0f}"
        lines.append(f"| {i} | {r['variant']} | {r['requests']:,} ({r['upstream']:,}) | "
                     f"{r['rps']:,.0f} | {r['per_req']:,.0f} | {r['worker_per_req']:,.1f} | "
                     f"{r['other_per_s']:,.0f} | {last} |")
    lines += [
        "",
        f"| median | {wo_name} | {w_name} | {w_name} / {wo_name} | {w_name} - {wo_name} |",
        "|---|---:|---:|---:|---:|",
        f"| Ir per request, whole process | {med(wo_name, 'per_req'):,.1f} | "
        f"{med(w_name, 'per_req'):,.1f} | {ratio('per_req')} | {diff('per_req')} |",
        f"| Ir per request, worker threads | {med(wo_name, 'worker_per_req'):,.1f} | "
        f"{med(w_name, 'worker_per_req'):,.1f} | {ratio('worker_per_req')} | "
        f"{diff('worker_per_req')} |",
        f"| other threads, Ir per second | {med(wo_name, 'other_per_s'):,.0f} | "
        f"{med(w_name, 'other_per_s'):,.0f} | {ratio('other_per_s')} | "
        f"{diff('other_per_s')} |",
        "",
        "Under callgrind the proxy serves far fewer requests per second than natively, so "
        "what the other threads do per second (the analysis or the store's link among it) "
        "weighs more per request "
        "in the whole-process figure than it does at full speed; the worker threads' figure "
        "is the hot path's own cost.",
    ]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    check_tools(args)
    settings = settings_for(args)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, load._interrupt)
    load.raise_fd_limit()
    procs = load.Processes()
    tmp = tempfile.mkdtemp(prefix="canary-instr-")
    keep = args.keep
    try:
        ports = dict(zip(("v1", "v2"), load.free_ports(2)))
        # The upstream's stub_status answers on v1's port (load.py's plain mode does the same).
        ports["status"] = ports["v1"]
        fleet = load.Fleet(tmp=tmp, ports=ports)
        if args.store:
            fleet.etcd_url, etcd_data = replicas.start_etcd(procs, tmp, cpu=settings.load_cpu)
            load.log(f"etcd {replicas.etcd_version()} at {fleet.etcd_url}, data in {etcd_data}")
        prefix, conf = load.write_upstream_conf(tmp, ports["v1"], ports["v2"])
        logf = os.path.join(prefix, "stdout.log")
        fleet.procs["upstream"] = procs.start(
            "upstream", ["taskset", "-c", str(settings.load_cpu), "nginx", "-p", prefix, "-c",
                         conf], logf)
        load.wait_listening(ports["v1"], fleet.procs["upstream"], "upstream nginx", logf)
        load.wait_listening(ports["v2"], fleet.procs["upstream"], "upstream nginx", logf)
        lua = load.write_post_lua(tmp) if args.post else write_headers_lua(tmp, args.header)
        runs = []
        for rep in range(args.repeat):
            order = args.variants if rep % 2 == 0 else args.variants[::-1]
            for variant in order:
                runs.append(one_run(args, settings, procs, fleet, variant, lua, len(runs) + 1))
        text = report(args, runs)
        print(text, end="")
        path = STORE_REPORT_PATH if args.store else REPORT_PATH
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        load.log(f"report written to {path}")
    except load.Interrupted as e:
        load.log(f"interrupted by {e}; stopping everything")
        sys.exit(130)
    except Exception as e:
        keep = True
        load.log(f"error: {e}")
        if not isinstance(e, RuntimeError):
            raise
        sys.exit(1)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            load.log(f"dumps, logs and configs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
