//! Crash safety: `kill -9` of the daemon in the middle of a pyneal stream leaves a session
//! folder that reopens with every volume acknowledged one TR before the kill, bit for bit as
//! sent, and nothing damaged after it.

use crate::common;

use std::time::{Duration, Instant};

use common::{as_strs, free_port, pyneal_daemon_args, pyneal_hello, pyneal_socket, Daemon};
use mirage_rt::io::session::SessionReader;

const DIMS: [usize; 3] = [64, 64, 36];
const TR_S: f64 = 0.1;

/// Voxel `(x, y, z)` of volume `v`: distinct across voxels and volumes, exact in float32.
fn voxel(v: u64, x: usize, y: usize, z: usize) -> f32 {
    (v as usize * 7 + x * 3 + y * 5 + z * 11) as f32 % 4096.0
}

/// The pyneal message of volume `v`: JSON header and a C-order (z fastest) float32 buffer.
fn message(v: u64) -> (String, Vec<u8>) {
    let header = serde_json::json!({"volIdx": v, "dtype": "float32", "shape": DIMS,
        "affine": "[[3,0,0,0],[0,3,0,0],[0,0,3,0],[0,0,0,1]]", "TR": TR_S.to_string()});
    let mut payload = Vec::with_capacity(DIMS.iter().product::<usize>() * 4);
    for x in 0..DIMS[0] {
        for y in 0..DIMS[1] {
            for z in 0..DIMS[2] {
                payload.extend_from_slice(&voxel(v, x, y, z).to_le_bytes());
            }
        }
    }
    (header.to_string(), payload)
}

#[test]
fn kill_9_mid_stream_keeps_every_volume_acknowledged_a_tr_before_intact() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let session = dir.path().join("session");
    let mut daemon = Daemon::start(&as_strs(&pyneal_daemon_args(port, "none", &session, &[])), dir.path());
    let ctx = zmq::Context::new();
    let s = pyneal_socket(&ctx, port);
    pyneal_hello(&s);

    // Stream at one volume per TR; after 40 acknowledged volumes, send one more and kill the
    // daemon while it is being received.
    let start = Instant::now();
    let mut acked: Vec<(u64, Instant)> = Vec::new();
    for v in 0..41u64 {
        let next = start + Duration::from_secs_f64(v as f64 * TR_S);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let (header, payload) = message(v);
        s.send_multipart([header.as_bytes(), &payload[..]], 0).unwrap();
        if v == 40 {
            break;
        }
        let reply = s.recv_string(0).unwrap().unwrap();
        assert_eq!(reply, format!("received volIdx {v}"), "{}", daemon.log());
        acked.push((v, Instant::now()));
    }
    let killed = Instant::now();
    daemon.kill9();

    let reader = SessionReader::open(&session).expect("the session folder reopens after kill -9");
    let must_have: Vec<u64> = acked
        .iter()
        .filter(|(_, t)| killed.duration_since(*t).as_secs_f64() >= TR_S)
        .map(|(v, _)| *v)
        .collect();
    assert!(must_have.len() >= 35, "only {} volumes acknowledged a TR before the kill", must_have.len());
    let recorded: Vec<u64> = reader.entries.iter().map(|e| e.index).collect();
    for v in &must_have {
        assert!(
            recorded.contains(v),
            "volume {v} was acknowledged a TR before the kill but is not recorded: {recorded:?}"
        );
    }
    // Every recorded volume (those after the deadline too) reads back exactly as sent.
    for (i, e) in reader.entries.iter().enumerate() {
        let vol = reader.volume(i).unwrap_or_else(|err| panic!("entry {i} (volume {}): {err}", e.index));
        assert_eq!(vol.dims, DIMS);
        for z in 0..DIMS[2] {
            for y in 0..DIMS[1] {
                for x in 0..DIMS[0] {
                    let got = vol.data[x + DIMS[0] * (y + DIMS[1] * z)];
                    assert_eq!(got, voxel(e.index, x, y, z), "volume {} voxel ({x},{y},{z})", e.index);
                }
            }
        }
    }
    assert_eq!(recorded, (0..recorded.len() as u64).collect::<Vec<_>>(), "recorded in order, no duplicates");
    eprintln!(
        "kill -9: 41 sent, {} acknowledged, {} of them a TR before the kill, {} recorded intact",
        acked.len(),
        must_have.len(),
        recorded.len()
    );
}
