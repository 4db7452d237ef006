#!/usr/bin/env python3
"""The whole loop against pyneal's, in one run on the same stream: one pyneal-scanner sender
(JSON header, then the volume's buffer, then wait for the reply, exactly as pyneal's
`utils/simulation/pynealScanner_sim.py` does) plays the same simulated series (`mirage
simulate`, float64 as that script sends `get_fdata()`) at the same TR into

  (a) pyneal (commit 750f0ec, MIT), unmodified: `pyneal.launchPyneal(headless=True,
      customSettingsFile=...)` in its own process, i.e. its ScanReceiver, Preprocessor (motion
      estimation with nipy's HistogramRegistration when `estimateMotion`), Analyzer and
      ResultsServer, wired and polled as pyneal.py wires them; its setup GUI's default settings
      (estimateMotion on, analysisChoice Average, maskIsWeighted on) but for the ports, the mask
      (the simulator's visual ROI), numTimepts, the output folder and launchDashboard (off: the
      dashboard is a separate web process a headless run does not need);
  (b) `mirage run --ingest pyneal://… --results …`: the default pipeline (motion, the online
      GLM on the simulator's events, ROI feedback on the same ROI, recording with fdatasync per
      volume; no decoder model given).

Per volume, latency = from the sender's stamp just before the volume's header goes to ZMQ (its
acquisition, as a trigger) to the first time a results-server client (plain TCP, pyneal's `'0024'` request, polled
every --poll-ms, the same client for both, in its own process) reads `foundResults: true` for
that volume. Stamps are time.monotonic() (CLOCK_MONOTONIC) in both processes. Prints n, p50,
p90, p99 and max per system, the ratios, the reply (ack) time, and the CPU seconds per volume
of each receiver process (/proc utime+stime, from the first volume sent to the last result
read, every thread included, the client's polls answered included), the share of volumes
answered within one TR, and how busy the whole machine was meanwhile (/proc/stat; other work on
the machine shows there and in the latencies).

usage: benches/pyneal_loop.py [--volumes 100] [--tr 1.0] [--shape X,Y,Z] [--pyneal DIR]
                              [--pyneal-motion on|off] [--poll-ms MS] [--json OUT]
Needs target/release/mirage (or $MIRAGE) and, in this python, numpy, nibabel, pyzmq, pyyaml and
nipy (pyneal's own requirements; `python3 -m pip install nipy`). --pyneal names a pyneal
checkout (`git clone https://github.com/jeffmacinnes/pyneal`, commit 750f0ec); without it
pyneal's tree is extracted from a bare git repository of it at $PYNEAL_MIRROR into a temporary
folder. Without nipy pyneal
runs with estimateMotion off, and the output says so. Without wxPython (pyneal imports its
setup GUI at module top) a stub `wx` module is put in sys.modules before the import; the GUI is
never opened in a headless run.
"""
import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRAGE = os.environ.get("MIRAGE", os.path.join(ROOT, "target", "release", "mirage"))
MIRROR = os.environ.get("PYNEAL_MIRROR", "")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Runs pyneal.py's own launchPyneal in this process; argv: pyneal dir, settings file.
PYNEAL_RUNNER = r'''
import os, sys, types
pyneal_dir, settings = sys.argv[1], sys.argv[2]
sys.path.insert(0, pyneal_dir)
os.chdir(pyneal_dir)
try:
    import wx  # noqa: F401
    print("pyneal-runner: wx real", flush=True)
except ImportError:
    # pyneal.py imports src.GUIs.pynealSetup.setupGUI at module top, which subclasses wx.Frame
    # and wx.App; a headless launch never calls it.
    class _NoGUI:
        def __init__(self, *a, **k):
            raise RuntimeError("wx stub: no GUI in a headless pyneal run")
    wx = types.ModuleType("wx")
    wx.Frame, wx.App = type("Frame", (_NoGUI,), {}), type("App", (_NoGUI,), {})
    wx.__getattr__ = lambda name: _NoGUI
    sys.modules["wx"] = wx
    print("pyneal-runner: wx stubbed", flush=True)
import pyneal
pyneal.launchPyneal(headless=True, customSettingsFile=settings)
print("pyneal-runner: launchPyneal returned", flush=True)
'''


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process, all its threads (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks():
    """(busy, total) CPU ticks of the whole machine, every core (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def percentile(sorted_ms, q):
    """Nearest rank, as mirage prints its percentiles."""
    return float(sorted_ms[min(max(int(np.ceil(q * len(sorted_ms))), 1), len(sorted_ms)) - 1])


def summary(ms):
    s = np.sort(np.asarray(ms, dtype=float))
    if len(s) == 0:
        return {"n": 0}
    return {"n": int(len(s)), "p50_ms": percentile(s, 0.5), "p90_ms": percentile(s, 0.9),
            "p99_ms": percentile(s, 0.99), "max_ms": float(s[-1]), "mean_ms": float(s.mean())}


def request(port, index, timeout=5.0):
    """pyneal's end-user request: the 4-character index, one JSON line back, then closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(str(index).zfill(4).encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.decode())


def wait_for_server(port, proc, timeout, log):
    """Until the results server answers a request (the receiver is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the receiver exited ({proc.returncode}) before its results server answered:\n{tail(log)}")
        try:
            request(port, 0, timeout=1.0)
            return
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SystemExit(f"no results server on 127.0.0.1:{port} after {timeout} s:\n{tail(log)}")


def poller(port, n, poll_s, skip_s, max_wait_s, sender_done, conn):
    """The results-server client (its own process): asks for the lowest volume not yet found,
    every poll_s, and stamps the first foundResults true. A volume not found while a later one
    is (asked after skip_s on it) is counted missing; after the sender is done, it stops
    max_wait_s later."""
    found = [None] * n
    answers = {}
    polls = errors = 0
    i = 0
    stuck_since = time.monotonic()
    done_at = None
    while i < n:
        now = time.monotonic()
        if done_at is None and sender_done.is_set():
            done_at = now
        if done_at is not None and now - done_at > max_wait_s:
            break
        try:
            r = request(port, i)
            polls += 1
        except (OSError, ValueError):
            r = None
            errors += 1
        t = time.monotonic()
        if r and r.get("foundResults"):
            found[i] = t
            if i in (0, n // 2, n - 1):
                answers[i] = r
            i += 1
            stuck_since = t
            continue
        if t - stuck_since > skip_s and i + 1 < n:
            try:
                later = request(port, i + 1)
            except (OSError, ValueError):
                later = None
            if later and later.get("foundResults"):
                i += 1  # volume i was never answered; i + 1 is found on the next poll
                stuck_since = time.monotonic()
                continue
        time.sleep(poll_s)
    conn.send({"found": found, "polls": polls, "errors": errors, "answers": answers})
    conn.close()


def send_stream(port, series, tr, hello, cpu_pid):
    """pynealScanner_sim.py's loop: PAIR connect, the hello exchange, sleep one TR, then per
    volume a JSON header (SNDMORE) and the buffer, wait for the reply, sleep to the next TR.
    Returns the sender's stamps and the receiver's CPU seconds at the first send."""
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send_string(hello)
    if s.recv_string() != hello:
        raise SystemExit("the receiver did not echo the hello")
    affine = json.dumps(series["affine"].tolist())
    data = series["data"]
    time.sleep(tr)  # pyneal's sender: one TR for the first volume's acquisition
    cpu0 = cpu_seconds(cpu_pid)
    sent, acked, replies = [], [], []
    for v in range(data.shape[3]):
        start = time.monotonic()
        vol = np.ascontiguousarray(data[:, :, :, v])
        header = {"volIdx": v, "dtype": str(vol.dtype), "shape": vol.shape, "affine": affine,
                  "TR": str(tr * 1000)}
        s.send_json(header, zmq.SNDMORE)
        s.send(vol, flags=0, copy=False, track=False)
        sent.append(start)
        replies.append(s.recv_string())
        acked.append(time.monotonic())
        rest = tr - (time.monotonic() - start)
        if rest > 0:
            time.sleep(rest)
    ctx.destroy(linger=0)
    return {"sent": sent, "acked": acked, "replies": replies, "cpu0": cpu0}


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def stop(proc, sig=signal.SIGTERM, wait=30):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(name, proc, log, ingest_port, results_port, series, args, hello, ready_timeout):
    """One system, the same sender and client; returns its figures."""
    n = series["data"].shape[3]
    try:
        wait_for_server(results_port, proc, ready_timeout, log)
        spawn = mp.get_context("spawn")
        done = spawn.Event()
        mine, theirs = spawn.Pipe(duplex=False)
        client = spawn.Process(target=poller, args=(results_port, n, args.poll_ms / 1e3, max(5.0, 10 * args.tr),
                                                     args.max_wait, done, theirs))
        client.start()
        load = os.getloadavg()
        busy0 = machine_ticks()
        stamps = send_stream(ingest_port, series, args.tr, hello, proc.pid)
        done.set()
        got = mine.recv()
        cpu1 = cpu_seconds(proc.pid) if proc.poll() is None else None
        busy1 = machine_ticks()
        load_end = os.getloadavg()
        client.join()
    finally:
        stop(proc)
    found = got["found"]
    lat = [(f - s) * 1e3 for f, s in zip(found, stamps["sent"]) if f is not None]
    ack = [(a - s) * 1e3 for a, s in zip(stamps["acked"], stamps["sent"])]
    q = max(1, n // 4)
    first = [(f - s) * 1e3 for f, s in zip(found[:q], stamps["sent"][:q]) if f is not None]
    last = [(f - s) * 1e3 for f, s in zip(found[-q:], stamps["sent"][-q:]) if f is not None]
    growth = float(np.median(last) - np.median(first)) if first and last else None
    answered = [f for f in found if f is not None]
    window = (answered[-1] - stamps["sent"][0]) if answered else None
    out = {
        "latency": summary(lat),
        "missing": int(sum(f is None for f in found)),
        "ack_ms": summary(ack),
        # A loop that keeps up has no growing backlog: the median of the last quarter of the
        # run exceeds the first quarter's by less than one TR.
        "backlog_growth_ms": growth,
        "kept_up": bool(growth is not None and growth < args.tr * 1e3 and not any(f is None for f in found)),
        "within_one_tr": float(np.mean([x < args.tr * 1e3 for x in lat])) if lat else None,
        # Over the window, per volume answered (a loop that fell behind answered fewer).
        "cpu_s_per_volume": ((cpu1 - stamps["cpu0"]) / max(1, len(answered))) if cpu1 is not None else None,
        "cpu_s_window": (cpu1 - stamps["cpu0"]) if cpu1 is not None else None,
        "cpu_window_s": window,
        "client_polls": got["polls"],
        "client_errors": got["errors"],
        "answers": {str(k): v for k, v in got["answers"].items()},
        "first_reply": stamps["replies"][0] if stamps["replies"] else None,
        "loadavg_at_start": [round(x, 2) for x in load],
        "loadavg_at_end": [round(x, 2) for x in load_end],
        # The whole machine's CPU use over the run (this receiver, the sender, the client and
        # anything else running), in % of all cores: other load shows here.
        "machine_busy_pct": round(100.0 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
        "latency_ms_per_volume": [round((f - s) * 1e3, 3) if f is not None else None
                                  for f, s in zip(found, stamps["sent"])],
    }
    if out["cpu_s_per_volume"] is None:
        out["cpu_note"] = "the receiver had exited before the last result was read"
    print(f"{name}: n {out['latency'].get('n')}, p50 {out['latency'].get('p50_ms', float('nan')):.1f} ms, "
          f"p99 {out['latency'].get('p99_ms', float('nan')):.1f} ms, missing {out['missing']}, "
          f"kept up {out['kept_up']}, machine busy {out['machine_busy_pct']} %", flush=True)
    return out


def extract_pyneal(dest):
    """pyneal's tree at the mirror's HEAD, blob by blob (a blob absent from the mirror, such as
    its 1 mm MNI template, is skipped and listed)."""
    if not MIRROR or not os.path.isdir(MIRROR):
        raise SystemExit("no pyneal: pass --pyneal DIR (a clone of github.com/jeffmacinnes/pyneal) "
                         "or set PYNEAL_MIRROR to a bare git repository of it")
    git = ["git", "-C", MIRROR]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tree = subprocess.run(git + ["ls-tree", "-r", "-z", "HEAD"], capture_output=True, check=True).stdout
    entries = []
    for rec in tree.split(b"\0"):
        if not rec:
            continue
        meta, path = rec.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind == b"blob":
            entries.append((mode.decode(), sha.decode(), path.decode()))
    cat = subprocess.Popen(git + ["cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    skipped = []
    for mode, sha, path in entries:
        cat.stdin.write((sha + "\n").encode())
        cat.stdin.flush()
        head = cat.stdout.readline().split()
        if len(head) < 3:
            skipped.append(path)
            continue
        body = cat.stdout.read(int(head[2]))
        cat.stdout.read(1)
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if mode == "120000":
            os.symlink(body.decode(), target)
            continue
        with open(target, "wb") as f:
            f.write(body)
        if mode == "100755":
            os.chmod(target, 0o755)
    cat.stdin.close()
    cat.wait()
    return commit, skipped


def versions():
    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "nibabel", "nipy", "zmq", "yaml", "wx"):
        try:
            m = __import__(mod)
            out[{"zmq": "pyzmq", "yaml": "pyyaml", "wx": "wxPython"}.get(mod, mod)] = getattr(m, "__version__", "?")
        except ImportError:
            out[{"zmq": "pyzmq", "yaml": "pyyaml", "wx": "wxPython"}.get(mod, mod)] = None
    try:
        import zmq
        out["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--tr", type=float, default=1.0, help="seconds (sent in ms, as pynealScanner_sim.py does)")
    ap.add_argument("--shape", default="64,64,36")
    ap.add_argument("--pyneal", metavar="DIR", help="a pyneal checkout (default: extracted from the mirror)")
    ap.add_argument("--pyneal-motion", choices=["on", "off"], default="on",
                    help="pyneal's estimateMotion (its default: on; needs nipy)")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="the client's sleep between requests")
    ap.add_argument("--max-wait", type=float, default=60.0,
                    help="seconds after the last send to wait for the remaining results")
    ap.add_argument("--only", choices=["pyneal", "mirage"], help="measure one system")
    ap.add_argument("--json", metavar="OUT", help="also write the results here")
    args = ap.parse_args()
    if not os.path.exists(MIRAGE):
        raise SystemExit(f"no {MIRAGE}: build it (cargo build --release) or set $MIRAGE")

    motion = args.pyneal_motion == "on"
    notes = []
    try:
        import nipy  # noqa: F401
    except ImportError:
        if motion:
            motion = False
            note = "nipy is not installed: pyneal ran with estimateMotion off (its default is on)"
            notes.append(note)
            print("NOTE: " + note, flush=True)

    children = []
    tmp = tempfile.mkdtemp(prefix="pyneal_loop-")

    def cleanup(*_):
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(143)))
    try:
        # pyneal.
        if args.pyneal:
            pyneal_dir = os.path.abspath(args.pyneal)
            if not os.path.exists(os.path.join(pyneal_dir, "pyneal.py")):
                raise SystemExit(f"{pyneal_dir} has no pyneal.py")
            r = subprocess.run(["git", "-C", pyneal_dir, "rev-parse", "HEAD"], capture_output=True, text=True)
            pyneal_commit, skipped = (r.stdout.strip() if r.returncode == 0 else "unknown"), []
            pyneal_source = "a checkout"
        else:
            pyneal_dir = os.path.join(tmp, "pyneal")
            pyneal_commit, skipped = extract_pyneal(pyneal_dir)
            pyneal_source = "a bare git repository of it, extracted"

        # The stream: one simulated series, the same bytes for both.
        run = os.path.join(tmp, "run")
        sim = [MIRAGE, "simulate", "--seed", "1", "--volumes", str(args.volumes), "--tr", str(args.tr),
               "--shape", args.shape, "--out", run]
        subprocess.run(sim, check=True, capture_output=True)
        import nibabel as nib
        img = nib.as_closest_canonical(nib.load(os.path.join(run, "bold.nii.gz")))  # as prepRealDataset
        series = {"data": img.get_fdata(), "affine": img.affine}
        roi = os.path.join(run, "truth", "roi_mask.nii.gz")
        events = os.path.join(run, "events.tsv")
        roi_voxels = int((nib.load(roi).get_fdata() > 0).sum())

        results = {}
        order = [args.only] if args.only else ["pyneal", "mirage"]
        pyneal_settings = None
        mirage_config = None
        for name in order:
            log = os.path.join(tmp, f"{name}.log")
            ingest_port = free_port()
            if name == "pyneal":
                results_port = free_port("0.0.0.0")  # pyneal's results server binds 0.0.0.0 itself
                out_dir = os.path.join(tmp, "pyneal_out")
                os.makedirs(out_dir)
                pyneal_settings = {
                    "pynealHost": "127.0.0.1", "pynealScannerPort": ingest_port,
                    "resultsServerPort": results_port, "maskFile": roi, "maskIsWeighted": True,
                    "estimateMotion": motion, "numTimepts": args.volumes, "analysisChoice": "Average",
                    "outputPath": out_dir, "launchDashboard": False, "dashboardPort": 5557,
                    "dashboardClientPort": 5558}
                settings = os.path.join(tmp, "pyneal_settings.yaml")
                with open(settings, "w") as f:
                    json.dump(pyneal_settings, f, indent=1)  # JSON is YAML; pyneal reads it with yaml.safe_load
                runner = os.path.join(tmp, "pyneal_runner.py")
                with open(runner, "w") as f:
                    f.write(PYNEAL_RUNNER)
                cmd = [sys.executable, "-u", runner, pyneal_dir, settings]
                hello = "hello from pynealScanner_sim"
            else:
                results_port = free_port()
                cfg = os.path.join(tmp, "mirage.toml")
                mirage_config = (f'[glm]\nevents = "{events}"\n'
                                 f'rois = [{{ name = "visual", path = "{roi}" }}]\n')
                with open(cfg, "w") as f:
                    f.write(mirage_config)
                cmd = [MIRAGE, "run", "--config", cfg, "--ingest", f"pyneal://127.0.0.1:{ingest_port}",
                       "--results", f"127.0.0.1:{results_port}", "--publish", "none", "--no-lsl",
                       "--console", "none", "--record", os.path.join(tmp, "session"), "--quiet"]
                hello = "hello from pynealScanner_sim"
            with open(log, "w") as lf:
                proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            children.append(proc)
            print(f"{name}: started, pid {proc.pid}", flush=True)
            results[name] = measure(name, proc, log, ingest_port, results_port, series, args, hello,
                                    ready_timeout=120)
            results[name]["log_tail"] = tail(log, 8).splitlines()
            if name == "pyneal":
                results[name]["wx"] = "stubbed" if "wx stubbed" in tail(log, 1000) else "real"

        doc_results = results
        ratios = {}
        if "pyneal" in results and "mirage" in results:
            p, m = results["pyneal"]["latency"], results["mirage"]["latency"]
            for k in ("p50_ms", "p99_ms"):
                if p.get(k) and m.get(k):
                    ratios[f"{k[:3]}_pyneal_over_mirage"] = p[k] / m[k]

        # The table.
        print(f"\n{args.volumes} volumes {args.shape.replace(',', 'x')} float64 at TR {args.tr} s, "
              f"results polled every {args.poll_ms} ms")
        print(f"{'system':<8} {'n':>4} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9} "
              f"{'ack p50':>8} {'CPU s/vol':>9} {'<1 TR':>6} {'busy %':>6}")
        for name, r in results.items():
            lat = r["latency"]
            cpu = r["cpu_s_per_volume"]
            print(f"{name:<8} {lat.get('n', 0):>4} {lat.get('p50_ms', float('nan')):>9.1f} "
                  f"{lat.get('p90_ms', float('nan')):>9.1f} {lat.get('p99_ms', float('nan')):>9.1f} "
                  f"{lat.get('max_ms', float('nan')):>9.1f} {r['ack_ms'].get('p50_ms', float('nan')):>8.2f} "
                  f"{(cpu if cpu is not None else float('nan')):>9.4f} {100 * (r['within_one_tr'] or 0):>5.0f}% "
                  f"{r['machine_busy_pct']:>6}")
        for k, v in ratios.items():
            print(f"{k}: {v:.1f}x")
        pyneal_desc = (f"pyneal {pyneal_commit[:7]}: estimateMotion {'on' if motion else 'off'} "
                       "(nipy HistogramRegistration to volume 4, from volume 5 on), Average over a weighted "
                       "mask (the simulator's visual ROI), dashboard off")
        print(pyneal_desc)
        for n_ in notes:
            print("NOTE: " + n_)
        # A check that both answer about the same data: volume 0 (no motion yet in either) has
        # the same ROI mean in pyneal's Average and mirage's ROI feedback.
        agreement = None
        if "pyneal" in results and "mirage" in results:
            a = results["pyneal"]["answers"].get("0", {})
            b = results["mirage"]["answers"].get("0", {})
            pa = a.get("weightedAverage", a.get("average"))
            if pa is not None and b.get("visual") is not None:
                agreement = {"pyneal_volume0_roi_mean": pa, "mirage_volume0_roi_mean": b["visual"]}
                print(f"volume 0 ROI mean: pyneal {pa}, mirage {b['visual']:.3f}")

        if args.json:
            commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            mv = subprocess.run([MIRAGE, "--version"], capture_output=True, text=True)
            doc = {
                "meta": {
                    "command": " ".join(["python3"] + sys.argv),
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "commit": commit,
                    "mirage_version": (mv.stdout or mv.stderr).strip(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "processor": platform.processor()},
                    "python_packages": versions(),
                    "pyneal": {"commit": pyneal_commit, "source": pyneal_source, "files_skipped": skipped,
                               "license": "MIT"},
                },
                "stream": {"volumes": args.volumes, "tr_s": args.tr, "shape": args.shape, "dtype": "float64",
                           "data": f"mirage simulate --seed 1 (phantom, default motion and trials); sent as "
                                   "pynealScanner_sim.py sends a real series (RAS+, get_fdata)",
                           "roi_voxels": roi_voxels, "poll_ms": args.poll_ms},
                "latency_definition": "sender's monotonic stamp just before the volume's header goes to ZMQ -> "
                                      "the client's first foundResults true for that volume (pyneal's TCP "
                                      "results protocol, one request per connection, polled every poll_ms, "
                                      "lowest unfound volume first)",
                "pyneal_settings": {k: v for k, v in (pyneal_settings or {}).items()
                                    if k not in ("maskFile", "outputPath")},
                "pyneal_description": pyneal_desc,
                "pyneal_notes": ["pyneal.py's own loop waits for each volume with time.sleep(.1) and for the "
                                 "scan start with time.sleep(.5): part of its latency, left as it is",
                                 "its results server binds 0.0.0.0 (hard-coded); everything else is on 127.0.0.1"]
                                + notes,
                "mirage_config": mirage_config,
                "mirage_description": "mirage run defaults (motion to volume 0, online trial GLM on the "
                                      "simulator's events.tsv, ROI mean and psc of the same ROI, session "
                                      "recorded with fdatasync per volume, no decoder model)",
                "results": doc_results,
                "ratios": ratios,
                "agreement": agreement,
            }
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            print(f"wrote {args.json}")
        ok = all(r["missing"] == 0 for r in results.values())
        return 0 if ok else 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
