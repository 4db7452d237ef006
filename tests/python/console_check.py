#!/usr/bin/env python3
"""Drives headless Chromium against the mirage-rt console page and checks that it shows the run.

    python3 tests/python/console_check.py URL [--report] [--screenshot PNG] [--timeout S]
        [--chromium /usr/bin/chromium] [--chromedriver /usr/bin/chromedriver] [--full-page]

Live mode (URL of a running daemon's console, e.g. http://127.0.0.1:8765/): waits until the
motion plot has >= 3 volumes, a decoded reconstruction has loaded and the end-to-end p50 latency
cell holds a number; then waits until all three update (more volumes, another status, another
decode). --report (a file:// URL of report.html): checks the embedded run without waiting for
updates. Prints one JSON line of what it saw to stdout and exits 0; on failure prints the reason
to stderr and exits 1. Needs Python `selenium` 4 and Debian's chromium + chromedriver; nothing is
downloaded (the driver and browser paths are given explicitly).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# One snapshot of everything the check looks at, read inside the page.
SNAPSHOT_JS = r"""
const q = (s) => document.querySelector(s);
const attr = (s, a) => { const e = q(s); if (!e) return null; const v = e.getAttribute(a); return v === null ? null : Number(v); };
const text = (s) => { const e = q(s); return e ? e.textContent.trim() : null; };
const cards = Array.from(document.querySelectorAll('.decode-card'));
const recons = Array.from(document.querySelectorAll('.decode-card img.recon'));
const e2e = text('#latency td[data-stage="end_to_end"][data-pct="p50"]');
const rows = Array.from(document.querySelectorAll('#metrics-table tbody tr[data-condition]'));
return {
  motion_points: attr('#motion-plot', 'data-points'),
  params_points: attr('#params-plot', 'data-points'),
  roi_points: attr('#roi-plot', 'data-points'),
  feedback_points: attr('#feedback-plot', 'data-points'),
  feedback_series: attr('#feedback-plot', 'data-series'),
  feedback_last: (() => { const e = q('#feedback-plot'); const v = e && e.getAttribute('data-last'); return v ? Number(v) : null; })(),
  latency_points: attr('#latency-plot', 'data-points'),
  latency_updates: attr('#latency', 'data-updates'),
  decodes: attr('#decodes', 'data-count'),
  decode_cards: cards.length,
  recons_loaded: recons.filter((i) => i.complete && i.naturalWidth > 0).length,
  newest_trial: cards.length ? cards[0].getAttribute('data-trial') : null,
  latency_rows: Array.from(document.querySelectorAll('#latency td[data-pct="p50"]')).map((c) => c.getAttribute('data-stage')),
  e2e_p50: e2e,
  e2e_p50_ok: e2e !== null && /^-?\d+(\.\d+)?$/.test(e2e) && isFinite(parseFloat(e2e)),
  mode: text('#mode'),
  calibration: text('#calibration'),
  conn: text('#conn'),
  events: attr('body', 'data-events'),
  handler_errors: attr('body', 'data-handler-errors'),
  page_errors: (window.__consoleCheckErrors || []).slice(0, 5),
  metrics_rows: rows.map((r) => Array.from(r.cells).map((c) => c.textContent.trim()).join(' | ')),
  metrics_conditions: rows.map((r) => r.getAttribute('data-condition')),
  replay_events: Array.isArray(window.MIRAGE_REPLAY) ? window.MIRAGE_REPLAY.length : null,
  replay_conditions: (() => {
    if (!Array.isArray(window.MIRAGE_REPLAY)) return null;
    const s = window.MIRAGE_REPLAY.filter((e) => e && e.topic === 'summary').pop();
    if (!s || !Array.isArray(s.conditions)) return [];
    return Array.from(new Set(s.conditions.map((c) => c && c.condition).filter((c) => c != null).map(String)));
  })(),
};
"""

# Installed before any page script runs: uncaught errors in the page fail the check.
ERROR_HOOK_JS = r"""
window.__consoleCheckErrors = [];
window.addEventListener('error', (e) => window.__consoleCheckErrors.push(String(e.message || e)));
window.addEventListener('unhandledrejection', (e) => window.__consoleCheckErrors.push('unhandled rejection: ' + String(e.reason)));
"""


class CheckFailed(Exception):
    pass


def make_driver(args, profile):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise CheckFailed(f"Python selenium is not installed ({e}): pip install selenium")
    for what, path in (("chromium", args.chromium), ("chromedriver", args.chromedriver)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            found = shutil.which(os.path.basename(path))
            hint = f" (found {found}: pass --{what} {found})" if found else " (Debian: apt-get install chromium chromium-driver)"
            raise CheckFailed(f"{what} not found at {path}{hint}")
    opts = Options()
    opts.binary_location = args.chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=args.chromedriver), options=opts)
    driver.set_window_size(1400, 1000)
    driver.set_page_load_timeout(max(10, args.timeout))
    driver.set_script_timeout(10)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK_JS})
    except Exception:  # not fatal: the page's own data-handler-errors is still checked
        pass
    return driver


def snapshot(driver):
    s = driver.execute_script(SNAPSHOT_JS)
    if s.get("page_errors"):
        raise CheckFailed(f"the page threw: {s['page_errors']}")
    if s.get("handler_errors"):
        raise CheckFailed(f"the page failed on {s['handler_errors']} event(s) (body data-handler-errors)")
    return s


def wait_for(driver, deadline, conditions, what):
    """Polls snapshots until every condition holds; on timeout says which never did."""
    s = snapshot(driver)
    while True:
        failing = [name for name, ok in conditions if not ok(s)]
        if not failing:
            return s
        if time.monotonic() > deadline:
            current = {k: s.get(k) for k in ("motion_points", "recons_loaded", "decodes", "e2e_p50",
                                              "latency_updates", "events", "conn", "mode")}
            raise CheckFailed(f"timed out waiting for {what}: never held: {'; '.join(failing)}; current values: {json.dumps(current)}")
        time.sleep(0.25)
        s = snapshot(driver)


def settle(driver, s, deadline, burst=200, step=0.5):
    """Lets the backlog (a page opened mid-run gets the whole run first) finish arriving, so
    that "before" is live data: until fewer than `burst` events arrive in `step` seconds, for at
    most a third of the time left or 10 s."""
    stop = time.monotonic() + min(10.0, max(0.0, deadline - time.monotonic()) / 3)
    while time.monotonic() < stop:
        time.sleep(step)
        n = snapshot(driver)
        grew = (n["events"] or 0) - (s["events"] or 0)
        s = n
        if grew < burst:
            break
    return s


def ready_conditions(decodes=True):
    return [
        ("#motion-plot data-points >= 3", lambda s: (s["motion_points"] or 0) >= 3),
        *([("a .decode-card img.recon loaded", lambda s: s["recons_loaded"] >= 1)] if decodes else []),
        ("end_to_end p50 cell holds a number", lambda s: s["e2e_p50_ok"]),
    ]


def screenshot(driver, path, full_page):
    if full_page:
        h = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        driver.set_window_size(1400, min(max(1000, int(h) + 100), 6000))
        time.sleep(0.3)
    if not driver.save_screenshot(path):
        raise CheckFailed(f"could not write the screenshot {path}")


def check(args):
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    profile = tempfile.mkdtemp(prefix="console-check-")
    driver = None
    try:
        driver = make_driver(args, profile)
        try:
            driver.get(args.url)
        except Exception as e:
            msg = str(getattr(e, "msg", "") or e).strip().splitlines()
            raise CheckFailed(f"cannot load {args.url}: {msg[0] if msg else type(e).__name__}")
        out = {"ok": True, "url": args.url, "check": "report" if args.report else "live"}
        if args.report:
            if snapshot(driver)["replay_events"] is None:
                raise CheckFailed("window.MIRAGE_REPLAY is not an array: not a report (was the replay marker substituted?)")
            s = wait_for(driver, deadline, ready_conditions(not args.no_decodes), "the report to render")
            problems = []
            if s["conn"] != "report":
                problems.append(f"#conn says {s['conn']!r}, not 'report'")
            if s["replay_events"] is None:
                problems.append("window.MIRAGE_REPLAY is not an array (replay marker not substituted?)")
            elif s["events"] != s["replay_events"]:
                problems.append(f"body data-events {s['events']} != {s['replay_events']} replayed events")
            missing = [c for c in (s["replay_conditions"] or []) if c not in s["metrics_conditions"]]
            if missing:
                problems.append(f"#metrics-table lacks rows for conditions {missing} (rows: {s['metrics_rows']})")
            if problems:
                raise CheckFailed("; ".join(problems))
            out["after"] = s
        else:
            before = wait_for(driver, deadline, ready_conditions(), "the first data")
            before = settle(driver, before, deadline)
            out["before"] = before
            out["ready_s"] = round(time.monotonic() - t0, 2)
            after = wait_for(driver, deadline, [
                (f"#motion-plot data-points > {before['motion_points']}", lambda s: s["motion_points"] > before["motion_points"]),
                (f"#latency data-updates > {before['latency_updates']}", lambda s: (s["latency_updates"] or 0) > (before["latency_updates"] or 0)),
                (f"#decodes data-count > {before['decodes']}", lambda s: (s["decodes"] or 0) > (before["decodes"] or 0)),
                ("a .decode-card img.recon loaded", lambda s: s["recons_loaded"] >= 1),
            ], "the page to update")
            out["after"] = after
        if args.screenshot:
            screenshot(driver, args.screenshot, args.full_page)
            out["screenshot"] = os.path.abspath(args.screenshot)
        s = out["after"]
        out.update(decode_cards=s["decode_cards"], mode_text=s["mode"], conn=s["conn"],
                   metrics_rows=s["metrics_rows"], elapsed_s=round(time.monotonic() - t0, 2))
        for snap in (out.get("before"), out["after"]):
            if snap:
                for k in ("page_errors", "handler_errors", "replay_conditions", "metrics_rows"):
                    snap.pop(k, None)
        print(json.dumps(out))
        return 0
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        shutil.rmtree(profile, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the console page: http://HOST:PORT/ (live) or file:///…/report.html (--report)")
    ap.add_argument("--report", action="store_true", help="check a report file: no waiting for updates")
    ap.add_argument("--no-decodes", action="store_true", help="a report of a run without decoding: no reconstruction to wait for")
    ap.add_argument("--screenshot", metavar="PNG", help="save a screenshot (1400x1000) once the checks pass")
    ap.add_argument("--full-page", action="store_true", help="make the screenshot as tall as the page")
    ap.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds for the whole check (default 60)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()
    if args.report and args.url.startswith("/"):
        args.url = "file://" + os.path.abspath(args.url)
    try:
        return check(args)
    except CheckFailed as e:
        print(f"console_check: FAIL: {e}", file=sys.stderr)
    except Exception as e:  # selenium / browser trouble
        print(f"console_check: FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
