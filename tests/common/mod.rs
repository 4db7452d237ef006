//! Helpers for integration tests: the real `mirage` binary, free loopback ports, the shared
//! real-data folder, the Python peers and a ZMQ subscriber.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mirage_rt::message::Received;

/// The `mirage` binary under test.
pub fn mirage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mirage"))
}

/// `mirage decode --device cpu --model MODEL --betas BETAS --out OUT`, for the caller to add
/// options to and run.
pub fn decode_cmd(model: &Path, betas: &Path, out: &Path) -> Command {
    let mut cmd = mirage();
    cmd.args(["decode", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--betas")
        .arg(betas)
        .arg("--out")
        .arg(out);
    cmd
}

/// A loopback port nobody is listening on right now, never the same twice in one test binary
/// (tests run in parallel and the OS may hand a just-released port out again).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The headers of the messages a session folder recorded under `topic`, in publish order;
/// each header of a typed topic is checked to read back as its type (`mirage_rt::topic`).
pub fn published(session: &Path, topic: &str) -> Vec<serde_json::Value> {
    use mirage_rt::topic::{
        self, BetasHeader, CalibrationHeader, DecodeHeader, MotionHeader, PictureHeader, RoiHeader,
        StatusHeader, VolumeHeader,
    };
    let headers: Vec<serde_json::Value> = std::fs::read_to_string(session.join("messages.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", session.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["topic"] == topic)
        .map(|m| m["header"].clone())
        .collect();
    for h in &headers {
        let typed = match topic {
            "volume" => topic::read::<VolumeHeader>(topic, h).map(drop),
            "motion" => topic::read::<MotionHeader>(topic, h).map(drop),
            "roi" => topic::read::<RoiHeader>(topic, h).map(drop),
            "betas" => topic::read::<BetasHeader>(topic, h).map(drop),
            "decode" => topic::read::<DecodeHeader>(topic, h).map(drop),
            "picture" => topic::read::<PictureHeader>(topic, h).map(drop),
            "calibration" => topic::read::<CalibrationHeader>(topic, h).map(drop),
            "status" => topic::read::<StatusHeader>(topic, h).map(drop),
            _ => Ok(()),
        };
        typed.unwrap_or_else(|e| panic!("{e}: {h}"));
    }
    headers
}

/// The page events a report embeds.
pub fn report_events(report: &Path) -> Vec<serde_json::Value> {
    let html = std::fs::read_to_string(report).unwrap();
    let start =
        html.find("window.MIRAGE_REPLAY = ").expect("replay script") + "window.MIRAGE_REPLAY = ".len();
    let end = start + html[start..].find(";</script>").expect("end of the replay script");
    serde_json::from_str(&html[start..end]).unwrap()
}

/// The headers a session folder recorded under `T`'s topic, read as `T`.
pub fn published_as<T: mirage_rt::topic::Topic + serde::de::DeserializeOwned>(session: &Path) -> Vec<T> {
    published(session, T::NAME)
        .iter()
        .map(|h| mirage_rt::topic::read::<T>(T::NAME, h).unwrap_or_else(|e| panic!("{e}: {h}")))
        .collect()
}

/// Held by a test whose daemon must finish a calibration fit inside a paced run: two such fits
/// at once on a 2-core machine can outlast the run (the tests share one binary and run in parallel).
pub fn live_fit_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A name unique to this test process and call (for LSL streams, which are found by name).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// A pylsl stimulus program: an LSL string marker outlet `name` that, once the daemon's inlet
/// connects (20 s at most), runs `then` (Python lines, the outlet as `o`, `time` imported).
pub fn marker_program(name: &str, then: &str) -> std::process::Command {
    let script = format!(
        "import pylsl, time\n\
         info = pylsl.StreamInfo('{name}', 'Markers', 1, 0, pylsl.cf_string, '{name}')\n\
         o = pylsl.StreamOutlet(info)\n\
         assert o.wait_for_consumers(20)\n{then}"
    );
    let mut c = std::process::Command::new("python3");
    c.arg("-c").arg(script);
    c
}

/// `rel` under `../shared/FOLDER` (or the folder `$VAR` names), which must exist.
fn shared(folder: &str, var: &str, what: &str, rel: &str) -> PathBuf {
    let root = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(folder));
    let p = root.join(rel);
    assert!(p.exists(), "{} is missing: the tests need the shared {what} (set {var})", p.display());
    p
}

/// A file under the shared real-data folder (`../shared/data`, or `$MIRAGE_SHARED_DATA`).
pub fn shared_data(rel: &str) -> PathBuf {
    shared("data", "MIRAGE_SHARED_DATA", "real data", rel)
}

/// A file of the shared third-party peers (`../shared/peers`, or `$MIRAGE_SHARED_PEERS`).
pub fn shared_peer(rel: &str) -> PathBuf {
    shared("peers", "MIRAGE_SHARED_PEERS", "peers", rel)
}

/// `python3` (or `$MIRAGE_PYTHON`) running a script from `tests/python`.
pub fn python(script: &str) -> Command {
    let py = std::env::var("MIRAGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let mut c = Command::new(py);
    c.current_dir(&dir).arg(dir.join(script));
    c
}

/// A script run with the Python that has PyTorch (Debian's `python3-torch`, installed by
/// `scripts/setup.sh --tests`): `$MIRAGE_TORCH_PYTHON`, else `/usr/bin/python3`; `script` is
/// relative to the repository.
pub fn torch_python(script: &str) -> Command {
    let py = std::env::var("MIRAGE_TORCH_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(&py).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{py} cannot import torch: run scripts/setup.sh --tests (or set MIRAGE_TORCH_PYTHON)");
    let mut c = Command::new(py);
    c.current_dir(root).arg(root.join(script));
    c
}

/// Runs a command to completion within `timeout`, returning its status and combined output.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let status = wait_timeout(&mut child, timeout);
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut out);
    }
    let status = status.unwrap_or_else(|| panic!("timed out after {timeout:?}; output so far:\n{out}"));
    (status, out)
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `mirage run` in the background whose log goes to a file; killed if still running on drop.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `mirage run ARGS`.
    pub fn start(args: &[&str], log_dir: &Path) -> Daemon {
        Daemon::start_with_env(args, log_dir, &[])
    }

    /// Starts `mirage run ARGS` with extra environment variables.
    pub fn start_with_env(args: &[&str], log_dir: &Path, env: &[(&str, &Path)]) -> Daemon {
        let log = log_dir.join(format!("daemon-{}.log", free_port()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = mirage()
            .envs(env.iter().copied())
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start mirage run");
        Daemon { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`; panics with the log on timeout or if the daemon
    /// exits first.
    pub fn wait_for_log(&mut self, text: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.log().contains(text) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited ({status}) before logging {text:?}:\n{}", self.log());
            }
            assert!(std::time::Instant::now() < deadline, "no {text:?} within {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the daemon to exit on its own; panics with its log on timeout.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        match wait_timeout(&mut self.child, timeout) {
            Some(s) => (s, self.log()),
            None => panic!("daemon did not exit within {timeout:?}; log:\n{}", self.log()),
        }
    }

    /// Kills the daemon with SIGKILL (no chance to flush or clean up) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `INT`, …).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ZMQ SUB socket on a daemon's publish port, subscribed to `topic`.
pub struct Subscriber {
    socket: zmq::Socket,
    _ctx: zmq::Context,
}

impl Subscriber {
    /// Connects (the daemon may bind later) and subscribes.
    pub fn connect(port: u16, topic: &str) -> Subscriber {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::SUB).unwrap();
        socket.set_rcvhwm(100_000).unwrap();
        socket.set_subscribe(topic.as_bytes()).unwrap();
        socket.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        Subscriber { socket, _ctx: ctx }
    }

    /// Receives until `n` messages arrived or `timeout` passed.
    pub fn collect(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if self.socket.poll(zmq::POLLIN, 100).unwrap_or(0) == 0 {
                continue;
            }
            let frames = self.socket.recv_multipart(0).unwrap();
            out.push(Received::decode(&frames).expect("a well-formed message"));
        }
        out
    }
}

/// Reads an `.npy` file, panicking with the reason.
pub fn npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    mirage_rt::io::npy::read_npy(p, 1 << 28).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command that must succeed within 5 minutes; returns its output.
pub fn run(cmd: &mut Command) -> String {
    let (status, out) = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(status.success(), "{cmd:?}:\n{out}");
    out
}

/// Simulates a still run of participant `seed` on a 32×32×20 grid and fits its trials:
/// returns (run folder, GLM folder).
pub fn simulated_session(
    dir: &Path,
    seed: u64,
    name: &str,
    condition: &str,
    run_seed: u64,
    volumes: u32,
) -> (PathBuf, PathBuf) {
    simulated_session_with(dir, seed, name, condition, run_seed, volumes, &[])
}

/// [`simulated_session`] with more simulator settings (`KEY=VALUE`).
pub fn simulated_session_with(
    dir: &Path,
    seed: u64,
    name: &str,
    condition: &str,
    run_seed: u64,
    volumes: u32,
    sets: &[&str],
) -> (PathBuf, PathBuf) {
    let run_dir = dir.join(name);
    run(mirage()
        .args(["simulate", "--seed", &seed.to_string(), "--shape", "32,32,20", "--condition", condition])
        .args(["--volumes", &volumes.to_string(), "--set", &format!("run_seed={run_seed}")])
        .args(["--set", "motion_mm=0", "--set", "motion_deg=0"])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .arg("--out")
        .arg(&run_dir));
    let glm = dir.join(format!("{name}-glm"));
    run(mirage()
        .arg("glm")
        .arg(run_dir.join("bold.nii.gz"))
        .arg("--events")
        .arg(run_dir.join("events.tsv"))
        .arg("--mask")
        .arg(run_dir.join("truth/roi_mask.nii.gz"))
        .arg("--out")
        .arg(&glm));
    (run_dir, glm)
}

/// Trains a model (alpha 1000) on a simulated session into `dir/model`.
pub fn train_model(dir: &Path, run_dir: &Path, glm: &Path) -> PathBuf {
    train_model_with(dir, run_dir, glm, "model", &[])
}

/// Trains a model (alpha 1000, then `extra` flags) on a simulated session into `dir/name`.
pub fn train_model_with(dir: &Path, run_dir: &Path, glm: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let model = dir.join(name);
    run(mirage()
        .args(["train", "--alpha", "1000", "--betas"])
        .arg(glm.join("trial_betas.npy"))
        .arg("--targets")
        .arg(run_dir.join("truth/targets/trials"))
        .arg("--mask")
        .arg(run_dir.join("truth/roi_mask.nii.gz"))
        .args(extra)
        .arg("--out")
        .arg(&model));
    model
}

/// `mirage run` flags for a quiet daemon on the simulator (`sim_query`: the `sim://?` query)
/// that records to `session`, publishes nothing, fits the GLM on `mask` and decodes with
/// `model` (and `gallery`) on the CPU; `extra` flags follow.
pub fn decode_daemon_args(
    sim_query: &str,
    session: &Path,
    mask: &str,
    model: &Path,
    gallery: Option<&Path>,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["--ingest", &format!("sim://?{sim_query}"), "--publish", "none", "--no-lsl"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--quiet".into(), "--record".into(), session.display().to_string()]);
    args.extend(["--set".into(), format!("glm.mask={mask}")]);
    args.extend(["--set".into(), format!("decode.model=\"{}\"", model.display())]);
    if let Some(g) = gallery {
        args.extend(["--set".into(), format!("decode.gallery=\"{}\"", g.display())]);
    }
    args.extend(["--set".into(), "decode.device=cpu".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Borrows a list of owned arguments as `&str`s.
pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `mirage run` flags for a quiet daemon taking pyneal on `port`, publishing to `publish`
/// (`none` or an address) and recording to `session`, without LSL; `extra` flags follow.
pub fn pyneal_daemon_args(port: u16, publish: &str, session: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        vec!["--ingest".into(), format!("pyneal://127.0.0.1:{port}"), "--publish".into()];
    args.extend([publish.to_string(), "--record".into(), session.display().to_string()]);
    args.extend(["--no-lsl", "--quiet"].iter().chain(extra).map(|s| s.to_string()));
    args
}

/// A PAIR socket connected to a pyneal receiver on `port` (10 s receive timeout, no linger).
pub fn pyneal_socket(ctx: &zmq::Context, port: u16) -> zmq::Socket {
    let s = ctx.socket(zmq::PAIR).unwrap();
    s.set_rcvtimeo(10_000).unwrap();
    s.set_linger(0).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    s
}

/// Exchanges pyneal-scanner's greeting on `s`.
pub fn pyneal_hello(s: &zmq::Socket) {
    s.send("hello", 0).unwrap();
    assert_eq!(s.recv_string(0).unwrap().unwrap(), "hello");
}

/// The JSON type of a value, integers apart from other numbers.
pub fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Checks a session's message log: every header field of every topic has one JSON type (null
/// where not known yet), indices, trials and stimuli are integers, gallery ids strings, and
/// every topic of a first run is there.
pub fn assert_one_type_per_field(session: &Path) {
    let log = std::fs::read_to_string(session.join("messages.jsonl")).unwrap();
    let mut types: std::collections::BTreeMap<(String, String), std::collections::BTreeSet<&'static str>> =
        Default::default();
    let mut topics = std::collections::BTreeSet::new();
    for line in log.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let topic = m["topic"].as_str().unwrap().to_string();
        topics.insert(topic.clone());
        for (key, v) in m["header"].as_object().unwrap() {
            types.entry((topic.clone(), key.clone())).or_default().insert(json_type(v));
        }
        for t in m["header"]["top"].as_array().into_iter().flatten() {
            assert_eq!(json_type(&t["id"]), "string", "{topic}: top[].id {t}");
        }
        for r in m["header"]["rois"].as_array().into_iter().flatten() {
            assert!(matches!(json_type(&r["psc"]), "number" | "integer" | "null"), "{r}");
        }
    }
    for topic in ["volume", "motion", "roi", "betas", "decode", "calibration", "status"] {
        assert!(topics.contains(topic), "no {topic} message in a first run: {topics:?}");
    }
    for ((topic, key), set) in &types {
        let mut kinds: Vec<&str> = set.iter().copied().filter(|k| *k != "null").collect();
        // A float field that happened to be whole is still one type.
        if kinds == ["integer", "number"] {
            kinds = vec!["number"];
        }
        assert!(kinds.len() <= 1, "{topic}.{key} has types {set:?}");
        if ["index", "trial", "stim", "seq"].contains(&key.as_str()) {
            assert!(kinds.is_empty() || kinds == ["integer"], "{topic}.{key} has types {set:?}");
        }
    }
}

/// The validator `scripts/setup.sh --tests` installs (or `$MIRAGE_BIDS_VALIDATOR`).
pub fn bids_validator() -> PathBuf {
    std::env::var_os("MIRAGE_BIDS_VALIDATOR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bids-validator/node_modules/.bin/bids-validator")
    })
}

/// The validator's errors and warnings on `dir` (their keys), failing if it cannot run.
pub fn validate(dir: &Path) -> (Vec<String>, Vec<String>) {
    let validator = bids_validator();
    assert!(validator.exists(), "{} missing: run scripts/setup.sh --tests", validator.display());
    let mut cmd = std::process::Command::new(&validator);
    cmd.arg(dir).arg("--json");
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(300));
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON from the validator:\n{out}"));
    let report: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("validator output:\n{out}"));
    let keys = |kind: &str| -> Vec<String> {
        report["issues"][kind]
            .as_array()
            .map(|a| a.iter().map(|i| format!("{}: {}", i["key"], i["reason"])).collect())
            .unwrap_or_default()
    };
    (keys("errors"), keys("warnings"))
}

/// `a` equals `b` element by element to `rel` of `b`'s largest magnitude.
pub fn close(a: &[f32], b: &[f32], rel: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= rel * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}
