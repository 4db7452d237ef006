//! What a scanner network does to a pyneal stream, over real sockets: duplicate indices (two
//! volumes per TR, as Siemens PACE sends), gaps, out-of-order arrival, NaN/Inf voxels, a grid
//! change and a moved grid mid-run, a second sender on the PAIR socket, a sender that dies mid-message and a new
//! one that reconnects, and a subscriber that never reads. The daemon flags and counts each,
//! records every volume it acknowledged as it came, and keeps going.

use crate::common;

use std::time::Duration;

use common::{as_strs, free_port, published, pyneal_daemon_args, pyneal_hello, pyneal_socket, Daemon};
use mirage_rt::io::session::SessionReader;

const AFFINE: &str = "[[3,0,0,0],[0,3,0,0],[0,0,3,0],[0,0,0,1]]";

/// The grid moved by 6 mm along x (the scanner's table or a new slice prescription).
const SHIFTED: &str = "[[3,0,0,6],[0,3,0,0],[0,0,3,0],[0,0,0,1]]";

/// A float32 C-order volume message whose voxels are `index + voxel / 1000`, with `special`
/// values at the first voxels.
fn message(index: u64, dims: [usize; 3], special: &[f32]) -> (String, Vec<u8>) {
    message_at(index, dims, special, AFFINE)
}

fn message_at(index: u64, dims: [usize; 3], special: &[f32], affine: &str) -> (String, Vec<u8>) {
    let header = serde_json::json!({"volIdx": index, "dtype": "float32", "shape": dims, "affine": affine, "TR": "0.5"});
    let n: usize = dims.iter().product();
    let mut values: Vec<f32> = (0..n).map(|i| index as f32 + i as f32 / 1000.0).collect();
    values[..special.len()].copy_from_slice(special);
    (header.to_string(), values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn send(s: &zmq::Socket, index: u64, dims: [usize; 3], special: &[f32]) {
    send_message(s, index, message(index, dims, special));
}

fn send_message(s: &zmq::Socket, index: u64, (header, payload): (String, Vec<u8>)) {
    s.send_multipart([header.as_bytes(), &payload[..]], 0).unwrap();
    assert_eq!(s.recv_string(0).unwrap().unwrap(), format!("received volIdx {index}"));
}

#[test]
fn scanner_faults_are_flagged_counted_recorded_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let (port, pub_port) = (free_port(), free_port());
    let session = dir.path().join("session");
    let publish = format!("tcp://127.0.0.1:{pub_port}");
    let extra = ["--set", "motion.enabled=false", "--set", "glm.enabled=false"];
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, &publish, &session, &extra)), dir.path());
    let ctx = zmq::Context::new();
    // A subscriber that connects and never reads.
    let deaf = ctx.socket(zmq::SUB).unwrap();
    deaf.set_rcvhwm(1).unwrap();
    deaf.set_subscribe(b"").unwrap();
    deaf.connect(&format!("tcp://127.0.0.1:{pub_port}")).unwrap();

    let (grid, other_grid) = ([8, 8, 6], [10, 8, 6]);
    let a = pyneal_socket(&ctx, port);
    pyneal_hello(&a);
    for i in 0..5 {
        send(&a, i, grid, &[]);
    }
    send(&a, 4, grid, &[]); // duplicate (PACE: two volumes per TR)
    send(&a, 7, grid, &[]); // gap: 5 and 6 missing
    send(&a, 5, grid, &[]); // late: out of order, fills one hole
    send(&a, 8, grid, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);

    // A second sender on the PAIR socket is not heard while the first is connected.
    let intruder = pyneal_socket(&ctx, port);
    let (h, p) = message(100, grid, &[]);
    let _ = intruder.send_multipart([h.as_bytes(), &p[..]], zmq::DONTWAIT);
    std::thread::sleep(Duration::from_millis(500));
    drop(intruder);

    // The sender dies in the middle of a message (header sent, payload never), then a new
    // sender connects and goes on.
    let (h, _) = message(9, grid, &[]);
    a.send(h.as_bytes(), zmq::SNDMORE).unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let b = pyneal_socket(&ctx, port);
    pyneal_hello(&b);
    send(&b, 9, grid, &[]);
    send_message(&b, 10, message_at(10, grid, &[], SHIFTED)); // moved grid: same run
    send(&b, 11, other_grid, &[]); // new grid: a new run
    for i in 12..300 {
        send(&b, i, other_grid, &[]); // enough to fill the deaf subscriber's queues
    }
    daemon.terminate();
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");

    let reader = SessionReader::open(&session).unwrap();
    let indices: Vec<u64> = reader.entries.iter().map(|e| e.index).collect();
    let mut want = vec![0, 1, 2, 3, 4, 4, 7, 5, 8, 9];
    want.extend(10..300);
    assert_eq!(
        indices, want,
        "every acknowledged volume recorded, in arrival order; nothing from the intruder"
    );
    let flag = |i: usize, k: &str| reader.entries[i].flags[k].clone();
    assert_eq!(flag(5, "duplicate"), true);
    assert_eq!(flag(6, "gap_before"), 2);
    assert_eq!(flag(7, "out_of_order"), true);
    let new_run = [0, 9, 10, 11].map(|i| flag(i, "new_run"));
    assert_eq!(new_run, [true, false, false, true].map(serde_json::Value::from));
    // A moved grid of the same dimensions stays in the run with its own affine; motion
    // correction realigns it in world space onto the reference grid.
    assert_eq!(reader.entries[10].affine[0][3], 6.0);
    // The first C-order voxels (z fastest) are (0, 0, z): x-fastest index 64·z.
    let nan = reader.volume(8).unwrap();
    let at = |z: usize| nan.data[grid[0] * grid[1] * z];
    assert!(at(0).is_nan() && at(1) == f32::INFINITY && at(2) == f32::NEG_INFINITY, "{:?}", &nan.data[..4]);
    assert_eq!(at(3), 8.003, "the rest of the volume as sent");
    assert_eq!(reader.volume(11).unwrap().dims, other_grid);

    let st = published(&session, "status").pop().expect("a final status");
    assert_eq!(st["received"], 300, "{st}");
    assert_eq!(st["recorded"], 300, "{st}");
    assert_eq!(st["published"], 300, "a subscriber that never reads slows nothing: {st}");
    assert_eq!(
        (st["duplicates"].as_u64(), st["missing"].as_u64(), st["out_of_order"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{st}"
    );
    assert_eq!(st["rejected"], 0, "{st}");
}

/// A smooth head-sized blob (motion correction registers it), the same in every volume.
fn blob(dims: [usize; 3]) -> Vec<u8> {
    let c = dims.map(|n| n as f32 / 2.0);
    let mut out = Vec::with_capacity(dims.iter().product::<usize>() * 4);
    for x in 0..dims[0] {
        for y in 0..dims[1] {
            for z in 0..dims[2] {
                let r2 = (x as f32 - c[0]).powi(2) + (y as f32 - c[1]).powi(2) + (z as f32 - c[2]).powi(2);
                out.extend_from_slice(&(100.0 + 1000.0 * (-r2 / 200.0).exp()).to_le_bytes());
            }
        }
    }
    out
}

#[test]
fn a_sender_faster_than_the_pipeline_is_held_back_counted_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("session");
    // One-slot queues and full-size volumes: motion correction is slower than ingest.
    let extra = ["--set", "pipeline.queue_capacity=1"];
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &extra)), dir.path());
    let ctx = zmq::Context::new();
    let s = pyneal_socket(&ctx, port);
    pyneal_hello(&s);
    let dims = [96, 96, 60];
    let payload = blob(dims);
    const N: u64 = 120;
    for i in 0..N {
        let header = serde_json::json!({"volIdx": i, "dtype": "float32", "shape": dims, "affine": AFFINE, "TR": "0.5"});
        send_message(&s, i, (header.to_string(), payload.clone()));
    }
    daemon.terminate();
    let (status, log) = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let st = published(&session, "status").pop().expect("a final status");
    for k in ["received", "recorded", "published"] {
        assert_eq!(st[k], N, "{k}: {st}");
    }
    let queues = st["queues"].as_array().unwrap();
    let blocked: u64 = queues.iter().map(|q| q["blocked"].as_u64().unwrap()).sum();
    let dropped: u64 = queues.iter().map(|q| q["dropped"].as_u64().unwrap()).sum();
    assert!(blocked > 0, "the sender outran the pipeline, so some push waited: {st}");
    assert_eq!(dropped, 0, "{st}");
    assert_eq!(SessionReader::open(&session).unwrap().entries.len() as u64, N);
}
