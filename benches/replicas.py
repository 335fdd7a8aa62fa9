#!/usr/bin/env python3
"""Replicas sharing one table through etcd ([store]): how long an admin write on one replica
takes to reach the data plane of the others.

What it measures
    One etcd (a temp data dir, free ports), the two upstreams v1 and v2 of load.py (one nginx,
    two ports, `/` answers "hello from v1" / "hello from v2"), and THREE canary-proxy
    processes A, B and C with the same config (load.py's, v1 and v2) plus the same [store]
    table (same etcd, same prefix; each its own listen and admin ports and its own snapshot
    file in its own temp dir). All three must show the store up with the table from etcd.

    Then, --writes times (default 100): POST /admin/weight on A, alternately
    `?v1=100&v2=0` and `?v1=0&v2=100` (200 required). The backend just given 100 is the "new"
    one: the table before the write never picks it (weight 0), so the first answer from it
    proves the new table is in force. One thread, one selector loop: just before the write is
    sent (t_send) it starts polling B's and C's DATA PLANE (GET / on one kept-alive
    connection per replica, the next GET sent as soon as the last answer is read, the backend
    read from the `x-canary-backend` header or the body) and keeps polling while the write is
    under way. Per replica it records when the first answer from the new backend arrived; A's
    answer time (t_reply) is recorded on the same clock. Reported per replica, over the writes:
    median, p90, p99 (nearest rank) and max of
      - from A's reply: t_seen - t_reply (negative when the replica had switched before A's
        answer arrived: A answers only after its own swap and the fsync of its snapshot file,
        while the others see etcd's watch event at the same time),
      - from the send: t_seen - t_send (the whole path: A's compare-and-swap in etcd, etcd's
        raft commit (an fsync of its WAL), the watch event, the replica's apply),
    and the polls per write. Also A's write round trip (t_reply - t_send), how busy the
    machine was during the writes (this benchmark's processes and the others), and what etcd's
    own /metrics say about its disk during the writes (WAL fsyncs, backend commits: on a
    shared disk the outliers come from there).

    Before each write both B and C must serve the old backend (then the write can only be
    seen by a switch); a write whose answer is not 200, or that either replica has not
    reached within 5 s (--give-up), is a failure (counted and reported; the next write waits,
    up to 5 s, for B and C to serve its old backend, else the run stops). After the last
    write, B and C must show the weights and the revision (ETag) of A's last answer.
    Between writes a pause of --gap seconds (default 0.1).

    No core pinning: three proxies (each with its default worker threads), etcd, nginx and
    this script share the machine; the poll loop keeps about one core busy.

How to run
    python3 benches/replicas.py                       # 100 writes, about 30 s
    python3 benches/replicas.py --writes 200 --binary PATH --csv /tmp/writes.csv
    python3 benches/replicas.py --etcd-dir /dev/shm   # etcd's data dir in RAM (cheaper fsync)

    Needs etcd (3.4 or later: `/usr/bin/etcd`) and nginx (nginx-light); installs nothing (exit
    2 when one is missing). Builds nothing: build target/release/canary-proxy first (`cargo
    build --release --locked`). Everything listens on 127.0.0.1 on free ports; everything it
    starts (etcd, nginx, the three proxies) runs in its own process group, dies with this
    script (PR_SET_PDEATHSIG), and is stopped at the end, also on failure or Ctrl-C; configs,
    logs, snapshots and etcd's data live in a temp dir that is removed (kept and printed on
    failure). The report goes to stdout and target/replicas.md; progress to stderr.
"""

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing load.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (load.py beside this file: processes, ports, configs)

REPORT_PATH = os.path.join(load.ROOT, "target", "replicas.md")
REPLICAS = ("A", "B", "C")
WATCHERS = ("B", "C")  # the replicas whose data plane is polled; A takes the writes
WEIGHTS = ("v1=100&v2=0", "v1=0&v2=100")  # alternately; the first write gives v1 100
NEW_BACKEND = {WEIGHTS[0]: "v1", WEIGHTS[1]: "v2"}
ETCD_DIRS = []  # data dirs start_etcd made (removed at the end unless kept)
POLL_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=load.CANARY_BIN,
                   help="the canary-proxy binary (default target/release/canary-proxy)")
    p.add_argument("--writes", type=int, default=100, help="admin writes on A (default 100)")
    p.add_argument("--give-up", type=float, default=5.0,
                   help="seconds after which a write not seen by B and C fails (default 5)")
    p.add_argument("--gap", type=float, default=0.1,
                   help="pause between writes, seconds (default 0.1)")
    p.add_argument("--etcd-dir", default=None,
                   help="parent of etcd's data dir (default the temp dir, i.e. $TMPDIR)")
    p.add_argument("--csv", default=None, help="also write every write's times to this file")
    a = p.parse_args()
    a.binary = os.path.abspath(a.binary)
    if not (os.path.isfile(a.binary) and os.access(a.binary, os.X_OK)):
        p.error(f"{a.binary}: not an executable file (cargo build --release --locked first)")
    if a.writes < 1 or a.give_up <= 0 or a.gap < 0:
        p.error("--writes must be at least 1, --give-up above 0, --gap at least 0")
    return a


def check_tools(tools=("etcd", "nginx")):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        print("needs: apt-get install etcd-server nginx-light")
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# etcd (also used by instructions.py --store)
# ---------------------------------------------------------------------------------------------

def etcd_version():
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0].split(":", 1)[-1].strip() if out else "?"


def fs_type(path):
    """The file system type of the mount holding path (from /proc/mounts), e.g. ext4, tmpfs."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def start_etcd(procs, tmp, data_parent=None, cpu=None):
    """One single-member etcd on 127.0.0.1, client and peer on free ports, data in a fresh
    directory under data_parent (default tmp), pinned to `cpu` when given. Returns
    (client URL, data dir) once GET /health answers healthy."""
    client, peer = load.free_ports(2)
    data = tempfile.mkdtemp(prefix="etcd-data-", dir=data_parent or tmp)
    ETCD_DIRS.append(data)
    url = f"http://127.0.0.1:{client}"
    peer_url = f"http://127.0.0.1:{peer}"
    argv = ["etcd", "--name", "bench", "--data-dir", data,
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"bench={peer_url}", "--initial-cluster-state", "new",
            "--log-level", "warn"]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    logf = os.path.join(tmp, "etcd.log")
    proc = procs.start("etcd", argv, logf)
    load.wait_listening(client, proc, "etcd", logf, timeout=20)
    deadline = time.monotonic() + 20
    while True:
        try:
            status, _, body = load.request(client, path="/health")
            if status == 200 and json.loads(body).get("health") in ("true", True):
                return url, data
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"etcd not healthy; log {logf}:\n" + load.tail(logf))
        time.sleep(0.1)


def etcd_histogram(etcd_url, name):
    """{le: cumulative count} plus "sum" and "count" of one histogram on etcd's /metrics."""
    port = int(etcd_url.rsplit(":", 1)[1])
    status, _, body = load.request(port, path="/metrics")
    if status != 200:
        raise RuntimeError(f"etcd /metrics -> {status}")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum "):
            out["sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count "):
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_line(before, after, label):
    """What a histogram counted between two reads: count, mean, how many above 8 / 64 ms,
    and the bucket of the slowest."""
    if "count" not in after:
        return f"{label}: not in etcd's /metrics"
    n = after["count"] - before.get("count", 0)
    if n <= 0:
        return f"{label}: none"
    mean = (after["sum"] - before.get("sum", 0)) / n * 1000
    bounds = sorted(k for k in after if isinstance(k, float))

    def above(limit):
        at = max((b for b in bounds if b <= limit), default=None)
        if at is None:
            return n
        return n - (after[at] - before.get(at, 0))
    slowest = next((b for b in bounds
                    if after[b] - before.get(b, 0) >= n), float("inf"))
    return (f"{label}: {n:.0f}, mean {mean:.2f} ms, above 8 ms {above(0.008):.0f}, above "
            f"64 ms {above(0.064):.0f}, slowest ≤ {slowest * 1000:.0f} ms")


def store_toml(etcd_url, prefix, snapshot):
    return f"""
[store]
etcd = ["{etcd_url}"]
prefix = "{prefix}"
snapshot = "{snapshot}"
"""


def store_status(admin_port):
    """/admin/routes' "store" object of one replica ({} when it has none)."""
    status, _, body = load.request(admin_port, path="/admin/routes")
    if status != 200:
        raise RuntimeError(f"GET /admin/routes -> {status} {body[:300]!r}")
    return json.loads(body).get("store") or {}


def wait_store_up(admin_port, name, timeout=30.0):
    """Waits until the replica's store is up with the table from etcd; returns its status."""
    deadline = time.monotonic() + timeout
    while True:
        st = store_status(admin_port)
        if st.get("up") and st.get("source") == "etcd":
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: the store is not up with the table from etcd after "
                               f"{timeout:.0f} s: {st}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# A tiny non-blocking HTTP/1.1 client (one request at a time per connection)
# ---------------------------------------------------------------------------------------------

class Conn:
    def __init__(self, port, name):
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""

    def send(self, data):
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: cannot send")
                time.sleep(0.0001)

    def on_readable(self):
        """Reads what is there; returns (status, headers, body) once an answer is complete,
        else None."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        if not data:
            raise RuntimeError(f"{self.name}: the connection was closed")
        self.buf += data
        return self._parse()

    def _parse(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        rest = self.buf[end + 4:]
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                return None
            body, self.buf = rest[:n], rest[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, used = dechunk(rest)
            if body is None:
                return None
            self.buf = rest[used:]
        else:
            raise RuntimeError(f"{self.name}: an answer without length: {lines[0]}")
        return status, headers, body

    def close(self):
        self.sock.close()


def dechunk(data):
    """(body, bytes used) of a complete chunked body at the start of data, or (None, 0)."""
    body, i = b"", 0
    while True:
        eol = data.find(b"\r\n", i)
        if eol < 0:
            return None, 0
        size = int(data[i:eol].split(b";")[0], 16)
        if size == 0:
            trailer_end = data.find(b"\r\n\r\n", eol)
            if trailer_end < 0:
                if data[eol:eol + 4] == b"\r\n\r\n":
                    return body, eol + 4
                return None, 0
            return body, trailer_end + 4
        if len(data) < eol + 2 + size + 2:
            return None, 0
        body += data[eol + 2:eol + 2 + size]
        i = eol + 2 + size + 2


def backend_of(headers, body):
    name = headers.get("x-canary-backend")
    if name:
        return name
    text = body.decode(errors="replace").strip()
    return text.rsplit(" ", 1)[-1] if text.startswith("hello from") else f"?{text[:40]}"


def poll_once(conn, timeout=5.0):
    """One blocking GET on a poll connection; returns the backend that answered."""
    conn.send(POLL_REQUEST)
    sel = selectors.DefaultSelector()
    sel.register(conn.sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                answer = conn.on_readable()
                if answer is not None:
                    status, headers, body = answer
                    if status != 200:
                        raise RuntimeError(f"{conn.name}: GET / -> {status} {body[:200]!r}")
                    return backend_of(headers, body)
        raise RuntimeError(f"{conn.name}: GET / not answered within {timeout} s")
    finally:
        sel.close()


def wait_serving(conn, backend, timeout):
    """Polls until the replica serves `backend`; returns the seconds it took (None: never)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if poll_once(conn) == backend:
            return time.monotonic() - start
        time.sleep(0.001)
    return None


# ---------------------------------------------------------------------------------------------
# One write
# ---------------------------------------------------------------------------------------------

def one_write(admin_port, pollers, weights, give_up):
    """Sends POST /admin/weight?WEIGHTS to A and polls B and C until each serves the new
    backend. Returns a dict: t_reply, seen {name: t}, polls {name: n} (times in s from t_send),
    status, version, error."""
    new = NEW_BACKEND[weights]
    admin = Conn(admin_port, "A admin")
    sel = selectors.DefaultSelector()
    pending = set()
    out = {"weights": weights, "t_reply": None, "seen": {}, "polls": {}, "status": None,
           "version": None, "error": None}
    try:
        path = f"/admin/weight?{weights}"
        write = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n").encode()
        sel.register(admin.sock, selectors.EVENT_READ, admin)
        for conn in pollers.values():
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            out["polls"][conn.name] = 0
        t_send = time.perf_counter()
        admin.send(write)
        for conn in pollers.values():
            conn.send(POLL_REQUEST)
        deadline = t_send + give_up
        pending = set(pollers)
        while pending or out["t_reply"] is None:
            left = deadline - time.perf_counter()
            if out["error"] is not None:
                break
            if left <= 0:
                missing = [n for n in WATCHERS if n in pending]
                if out["t_reply"] is None:
                    missing.insert(0, "A's answer")
                out["error"] = f"gave up after {give_up} s waiting for {', '.join(missing)}"
                break
            for key, _ in sel.select(timeout=left):
                conn = key.data
                answer = conn.on_readable()
                if answer is None:
                    continue
                now = time.perf_counter() - t_send
                status, headers, body = answer
                if conn is admin:
                    out["t_reply"], out["status"] = now, status
                    sel.unregister(admin.sock)
                    if status == 200:
                        out["version"] = json.loads(body).get("version")
                        continue
                    out["error"] = f"A answered {status} {body[:200]!r}"
                    break
                out["polls"][conn.name] += 1
                if status != 200:
                    raise RuntimeError(f"{conn.name}: GET / -> {status} {body[:200]!r}")
                if backend_of(headers, body) == new:
                    out["seen"][conn.name] = now
                    pending.discard(conn.name)
                    sel.unregister(conn.sock)
                else:
                    conn.send(POLL_REQUEST)
        if out["error"] is None and out["status"] != 200:
            out["error"] = f"A answered {out['status']}"
    finally:
        sel.close()
        admin.close()
    if pending and out["error"] is not None:
        # A poll may still be in flight: drain it so the connection stays usable.
        for name in pending:
            conn = pollers[name]
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                s = selectors.DefaultSelector()
                s.register(conn.sock, selectors.EVENT_READ)
                ready = s.select(timeout=0.5)
                s.close()
                if ready and conn.on_readable() is not None:
                    break
    return out


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------

def start_replicas(args, procs, tmp, up_ports, etcd_url, prefix):
    """A, B and C: the same config (own ports, own snapshot in their own dir). Returns
    {name: (port, admin_port)}."""
    replicas = {}
    for name in REPLICAS:
        rdir = os.path.join(tmp, f"replica-{name}")
        os.makedirs(rdir)
        port, admin = load.free_ports(2)
        conf = load.write_canary_conf(rdir, port, admin, up_ports["v1"], up_ports["v2"],
                                      os.environ.get("CANARY_EXTRA", ""))
        with open(conf, "a") as f:
            f.write(store_toml(etcd_url, prefix, os.path.join(rdir, "canary.snapshot.json")))
        check = subprocess.run([args.binary, "check", "--config", conf], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"canary-proxy check rejected {conf}:\n{check.stdout}"
                               f"{check.stderr}")
        logf = os.path.join(rdir, "proxy.log")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        proc = procs.start(f"canary {name}", [args.binary, "--config", conf], logf, env=env)
        load.wait_listening(port, proc, f"canary-proxy {name}", logf, timeout=30)
        load.wait_listening(admin, proc, f"canary-proxy {name} admin", logf, timeout=30)
        replicas[name] = (port, admin)
    for name, (_, admin) in replicas.items():
        st = wait_store_up(admin, name)
        load.log(f"replica {name}: store up, source {st['source']}, replica id "
                 f"{st.get('replica')}, prefix {st.get('prefix')}")
    return replicas


def weights_and_etag(admin_port):
    status, headers, body = load.request(admin_port, path="/admin/weight")
    if status != 200:
        raise RuntimeError(f"GET /admin/weight -> {status} {body[:200]!r}")
    return json.loads(body), headers.get("etag", "")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def pct(values, q):
    return load.percentile(sorted(values), q)


def ms_row(label, values):
    if not values:
        return f"| {label} | - | - | - | - | - |"
    v = [x * 1000 for x in values]
    return (f"| {label} | {len(v)} | {statistics.median(v):.2f} | {pct(v, 0.90):.2f} | "
            f"{pct(v, 0.99):.2f} | {max(v):.2f} |")


def report(args, results, info):
    ok = [r for r in results if r["error"] is None]
    failed = [r for r in results if r["error"] is not None]
    lines = [
        "# canary-proxy: replicas sharing one table through etcd ([store])", "",
        f"- binary {args.binary} (built {load.built_at(args.binary)}; checkout "
        f"{load.git_commit(load.ROOT) or '?'})",
        f"- etcd {info['etcd_version']}, one member on 127.0.0.1, data dir on "
        f"{info['etcd_fs']}; three replicas A, B, C (same config and [store] prefix, "
        "default lease_ttl and timeout); upstreams v1 and v2 on one nginx",
        f"- {len(results)} writes POST /admin/weight on A, alternately `{WEIGHTS[0]}` and "
        f"`{WEIGHTS[1]}`, {args.gap} s apart; B's and C's data planes polled (GET / on a "
        "kept-alive connection each, back to back, one selector loop) until the newly "
        f"weighted backend answers; give up after {args.give_up} s",
        f"- {len(ok)} writes ok, {len(failed)} failed"
        + ("".join(f"\n  - write {r['index']} ({r['weights']}): {r['error']}" for r in failed)),
        f"- load average before {info['load_before']}, after {info['load_after']} "
        f"({os.cpu_count()} CPUs); CPU {info['cpu']}",
        "",
        "| time (ms) until the replica's data plane serves the new backend | writes | median "
        "| p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in WATCHERS:
        seen = [r["seen"][name] for r in ok]
        lines.append(ms_row(f"{name}, from A's reply", [s - r["t_reply"]
                                                       for s, r in zip(seen, ok)]))
        lines.append(ms_row(f"{name}, from just before the write was sent", seen))
    lines.append(ms_row("A's write itself: sent -> A's reply (200)", [r["t_reply"] for r in ok]))
    both = [max(r["seen"].values()) for r in ok]
    lines.append(ms_row("both B and C, from just before the write was sent", both))
    lines += ["", "| polls per write | median | p90 | max | total |", "|---|---:|---:|---:|---:|"]
    for name in WATCHERS:
        polls = [r["polls"][name] for r in ok]
        if polls:
            lines.append(f"| {name} | {statistics.median(polls):.0f} | {pct(polls, 0.90)} | "
                         f"{max(polls)} | {sum(polls)} |")
    early = {name: sum(1 for r in ok if r["seen"][name] < r["t_reply"]) for name in WATCHERS}
    lines += [
        "",
        f"- served the new backend before A's reply arrived (negative 'from A's reply'): "
        + ", ".join(f"{n} {early[n]} of {len(ok)}" for n in WATCHERS),
        f"- poll round trip (mean: time polled / polls, over the writes): "
        + ", ".join(f"{n} {info['poll_rtt'][n]}" for n in WATCHERS),
        f"- etcd during the writes (its /metrics): {info['etcd_disk']}",
        f"- end check: {info['end_check']}",
    ]
    slow = sorted(ok, key=lambda r: -max(r["seen"].values()))[:3]
    if slow:
        lines.append("- slowest writes (from the send, ms; B / C / A's reply): " + "; ".join(
            f"#{r['index']} {r['seen']['B'] * 1000:.1f} / {r['seen']['C'] * 1000:.1f} / "
            f"{r['t_reply'] * 1000:.1f}" for r in slow))
    return "\n".join(lines) + "\n"


def write_csv(path, results):
    with open(path, "w") as f:
        f.write("index,weights,status,version,t_reply_ms,seen_B_ms,seen_C_ms,polls_B,polls_C,"
                "error\n")
        for r in results:
            def ms(x):
                return f"{x * 1000:.3f}" if x is not None else ""
            f.write(f"{r['index']},{r['weights']},{r['status'] or ''},{r['version'] or ''},"
                    f"{ms(r['t_reply'])},{ms(r['seen'].get('B'))},{ms(r['seen'].get('C'))},"
                    f"{r['polls'].get('B', '')},{r['polls'].get('C', '')},"
                    f"\"{(r['error'] or '').replace(chr(34), chr(39))}\"\n")


def loadavg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_jiffies():
    """(busy, total) jiffies of all cores together, from /proc/stat's cpu line."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


def own_cpu(procs):
    """CPU seconds of everything this script started (and their children) and of itself."""
    pids = set()
    for _, proc in procs.procs:
        pids.add(proc.pid)
        pids.update(load.children_of(proc.pid))
    total = 0.0
    for pid in pids:
        try:
            total += load.cpu_seconds([pid])
        except (OSError, IndexError):
            pass
    t = os.times()
    return total + t.user + t.system


class CpuWindow:
    """The machine's CPU over a window: all cores busy, this benchmark's processes, the
    rest (other programs, also short-lived ones), in cores (1.0 = one core's time)."""

    def __init__(self, procs):
        self.procs = procs
        self.wall0 = time.monotonic()
        self.jiffies0 = machine_jiffies()
        self.own0 = own_cpu(procs)
        self.snap0 = load.all_process_cpu()

    def close(self):
        wall = time.monotonic() - self.wall0
        busy1, total1 = machine_jiffies()
        busy = (busy1 - self.jiffies0[0]) / load.CLK_TCK / wall
        own = (own_cpu(self.procs) - self.own0) / wall
        sessions = self.procs.sessions() | {os.getsid(0)}
        names = load.outside_load(self.snap0, load.all_process_cpu(), sessions, wall)
        return (f"over the {wall:.0f} s of writes, {os.cpu_count()} cores: busy "
                f"{busy:.2f} cores, of which this benchmark (etcd, nginx, proxies, this "
                f"script) {own:.2f}, other programs {max(0.0, busy - own):.2f}"
                + (f" (long-lived ones above 5%: {names})" if names else ""))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def run(args, procs, tmp):
    info = {"load_before": loadavg(), "etcd_version": etcd_version()}
    etcd_url, etcd_data = start_etcd(procs, tmp, args.etcd_dir)
    info["etcd_fs"] = f"{fs_type(etcd_data)} ({etcd_data})"
    load.log(f"etcd {info['etcd_version']} at {etcd_url}, data in {etcd_data} "
             f"({fs_type(etcd_data)})")
    up_ports = dict(zip(("v1", "v2"), load.free_ports(2)))
    prefix, conf = load.write_upstream_conf(tmp, up_ports["v1"], up_ports["v2"])
    logf = os.path.join(prefix, "stdout.log")
    nginx = procs.start("upstream", ["nginx", "-p", prefix, "-c", conf], logf)
    for v in ("v1", "v2"):
        load.wait_listening(up_ports[v], nginx, "upstream nginx", logf)
    store_prefix = f"/canary-bench/{uuid.uuid4().hex[:12]}"
    replicas = start_replicas(args, procs, tmp, up_ports, etcd_url, store_prefix)
    pollers = {name: Conn(replicas[name][0], name) for name in WATCHERS}
    admin_a = replicas["A"][1]
    try:
        # Start from a known state: the table before the first measured write must give its
        # new backend 0, so a warm-up write sets the other weights and B and C must serve them.
        warm = WEIGHTS[1]
        status, _, body = load.request(admin_a, "POST", f"/admin/weight?{warm}")
        if status != 200:
            raise RuntimeError(f"warm-up write on A -> {status} {body[:200]!r}")
        for name, conn in pollers.items():
            if wait_serving(conn, NEW_BACKEND[warm], args.give_up) is None:
                raise RuntimeError(f"{name} did not serve {NEW_BACKEND[warm]} within "
                                   f"{args.give_up} s of the warm-up write")
        results = []
        rtt_time = {n: 0.0 for n in WATCHERS}
        window = CpuWindow(procs)
        fsync0 = etcd_histogram(etcd_url, "etcd_disk_wal_fsync_duration_seconds")
        commit0 = etcd_histogram(etcd_url, "etcd_disk_backend_commit_duration_seconds")
        in_force = warm  # the weights of A's table
        for i in range(args.writes):
            # Alternate; a write A refused changed nothing, so the next one is the same.
            weights = WEIGHTS[1] if in_force == WEIGHTS[0] else WEIGHTS[0]
            old = NEW_BACKEND[in_force]
            for name, conn in pollers.items():
                # Both must serve the old backend, else a switch would not be seen as one.
                if poll_once(conn) != old and wait_serving(conn, old, args.give_up) is None:
                    raise RuntimeError(f"before write {i + 1}: {name} does not serve {old} "
                                       f"within {args.give_up} s; the replicas diverged")
            r = one_write(admin_a, pollers, weights, args.give_up)
            r["index"] = i + 1
            if r["status"] == 200:
                in_force = weights
            results.append(r)
            if r["error"] is None:
                for n in WATCHERS:
                    rtt_time[n] += r["seen"][n]
                load.log(f"write {i + 1:>3} {weights:<12} rev {r['version']}: A's reply "
                         f"{r['t_reply'] * 1000:7.2f} ms; B {r['seen']['B'] * 1000:7.2f} ms "
                         f"({r['polls']['B']} polls), C {r['seen']['C'] * 1000:7.2f} ms "
                         f"({r['polls']['C']} polls)")
            else:
                load.log(f"write {i + 1:>3} {weights:<12} FAILED: {r['error']}")
            if args.gap:
                time.sleep(args.gap)
        info["cpu"] = window.close()
        info["etcd_disk"] = "; ".join((
            histogram_line(fsync0, etcd_histogram(
                etcd_url, "etcd_disk_wal_fsync_duration_seconds"), "WAL fsyncs"),
            histogram_line(commit0, etcd_histogram(
                etcd_url, "etcd_disk_backend_commit_duration_seconds"), "backend commits")))
        ok = [r for r in results if r["error"] is None]
        info["poll_rtt"] = {}
        for n in WATCHERS:
            polls = sum(r["polls"][n] for r in ok)
            info["poll_rtt"][n] = (f"{rtt_time[n] / polls * 1e6:.0f} µs" if polls else "-")
        # End check: B and C hold A's last table (weights and revision).
        a_weights, a_etag = weights_and_etag(admin_a)
        last_ok = ok[-1] if ok else None
        checks = []
        deadline = time.monotonic() + args.give_up
        for name in WATCHERS:
            while True:
                w, etag = weights_and_etag(replicas[name][1])
                if (w, etag) == (a_weights, a_etag) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            same = (w, etag) == (a_weights, a_etag)
            checks.append(f"{name} {'=' if same else '≠'} A ({w}, ETag {etag})")
            if not same:
                raise RuntimeError(f"after the writes {name} has {w} ETag {etag}, A has "
                                   f"{a_weights} ETag {a_etag}")
        info["end_check"] = (f"A {a_weights} ETag {a_etag} (last write's version "
                             f"{last_ok['version'] if last_ok else '-'}); " + "; ".join(checks))
        for name, (_, admin) in replicas.items():
            st = store_status(admin)
            if not (st.get("up") and st.get("source") == "etcd"):
                raise RuntimeError(f"{name}: store not up after the writes: {st}")
        logs = {name: load.tail(os.path.join(tmp, f"replica-{name}", "proxy.log"), 5).strip()
                for name in REPLICAS}
        for name, text in logs.items():
            if text:
                load.log(f"replica {name}'s log ends with:\n{text}")
    finally:
        for conn in pollers.values():
            conn.close()
    info["load_after"] = loadavg()
    return results, info


def main():
    args = parse_args()
    check_tools()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, load._interrupt)
    load.raise_fd_limit()
    procs = load.Processes()
    tmp = tempfile.mkdtemp(prefix="canary-replicas-")
    keep = False
    try:
        results, info = run(args, procs, tmp)
        text = report(args, results, info)
        print(text, end="")
        os.makedirs(os.path.dirname(REPORT_PATH), exist_ok=True)
        with open(REPORT_PATH, "w") as f:
            f.write(text)
        if args.csv:
            write_csv(args.csv, results)
            load.log(f"per-write times written to {args.csv}")
        load.log(f"report written to {REPORT_PATH}")
        if any(r["error"] is not None for r in results):
            keep = True
            sys.exit(1)
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
            load.log(f"logs, configs and etcd's data kept in {tmp}"
                     + (f" and {ETCD_DIRS[0]}" if ETCD_DIRS and args.etcd_dir else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in ETCD_DIRS:
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
