//! pyneal:// and zmq:// ingest against real peers: a pyzmq client speaking pyneal-scanner's
//! protocol, a pyzmq subscriber, and hostile messages from a Rust client.

use crate::common;

use std::time::Duration;

use common::{
    as_strs, free_port, published, pyneal_daemon_args, pyneal_hello, pyneal_socket, python, run_with_timeout,
    shared_data, Daemon, Subscriber,
};
use mirage_rt::io::nifti::read_nifti;
use mirage_rt::io::session::SessionReader;

#[test]
fn pyneal_sender_real_uint16_and_float64_volumes_arrive_exactly_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (pp, sp) = (free_port(), free_port());
    let session = dir.path().join("session");
    let series = shared_data("pyneal-testseries/testSeries.nii.gz");
    // Transport checks: volumes must come out exactly as sent.
    let extra = ["--stop-after", "8", "--set", "motion.enabled=false", "--set", "glm.enabled=false"];
    let publish = format!("tcp://127.0.0.1:{sp}");
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(pp, &publish, &session, &extra)), dir.path());
    let (status, out) = run_with_timeout(
        python("pyneal_roundtrip.py").args([
            "--pyneal",
            &format!("tcp://127.0.0.1:{pp}"),
            "--sub",
            &format!("tcp://127.0.0.1:{sp}"),
            "--nifti",
            series.to_str().unwrap(),
            "--float64",
            "5",
        ]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "python peer failed:\n{out}\ndaemon log:\n{}", daemon.log());
    let report: serde_json::Value = serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(report["received"], 8);
    assert_eq!(report["replies"][0], "received volIdx 0");
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("received 8 recorded 8 published 8"), "{log}");

    // The session holds every volume; the real ones equal our reader's view of the file.
    let rec = SessionReader::open(&session).unwrap();
    assert_eq!(rec.entries.len(), 8);
    let img = read_nifti(&series, 1 << 24).unwrap();
    for (t, expected) in img.volumes.iter().enumerate() {
        let v = rec.volume(t).unwrap();
        assert_eq!(&v.data, expected, "volume {t}");
        assert_eq!(v.affine, img.affine);
        assert_eq!((v.index, v.dims), (t as u64, img.dims));
    }
    assert_eq!(rec.volume(5).unwrap().dims, [16, 20, 12]);
    // Every published message is in the log, ending with a final status.
    let log = std::fs::read_to_string(session.join("messages.jsonl")).unwrap();
    let topics: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["topic"].to_string())
        .collect();
    assert_eq!(topics.iter().filter(|t| *t == "\"volume\"").count(), 8);
    assert_eq!(topics.last().unwrap(), "\"status\"");
}

/// Sends frames on a ZMQ socket of `kind` connected to `port`.
fn send(socket: &zmq::Socket, frames: &[&[u8]]) {
    socket.send_multipart(frames.iter().copied(), 0).unwrap();
}

fn header(idx: u64, dtype: &str, shape: [usize; 3]) -> String {
    serde_json::json!({"volIdx": idx, "dtype": dtype, "shape": shape,
        "affine": "[[2,0,0,0],[0,2,0,0],[0,0,2,0],[0,0,0,1]]", "TR": "1.0"})
    .to_string()
}

fn last_status(session: &std::path::Path) -> serde_json::Value {
    published(session, "status").pop().expect("a status message")
}

#[test]
fn bad_pyneal_messages_are_answered_counted_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (pp, sp) = (free_port(), free_port());
    let session = dir.path().join("s");
    let sub = Subscriber::connect(sp, "volume");
    // Transport checks: volumes must come out exactly as sent.
    let extra = ["--stop-after", "1", "--set", "motion.enabled=false", "--set", "glm.enabled=false"];
    let publish = format!("tcp://127.0.0.1:{sp}");
    let daemon = Daemon::start(&as_strs(&pyneal_daemon_args(pp, &publish, &session, &extra)), dir.path());
    let ctx = zmq::Context::new();
    let s = pyneal_socket(&ctx, pp);
    pyneal_hello(&s);
    std::thread::sleep(Duration::from_millis(300));
    let good = header(0, "float32", [2, 3, 4]);
    let payload: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![b"{not json".to_vec(), payload.clone()], "error"),
        (vec![good.clone().into_bytes(), payload[..95].to_vec()], "error volIdx 0"),
        (vec![header(0, "complex128", [2, 3, 4]).into_bytes(), payload.clone()], "error volIdx 0"),
        (vec![header(0, "int16", [100_000, 100_000, 100_000]).into_bytes(), vec![0; 8]], "error volIdx 0"),
        (vec![good.clone().into_bytes(), payload.clone(), b"extra".to_vec()], "error"),
        (vec![good.into_bytes(), payload], "received volIdx 0"),
    ];
    for (frames, reply) in cases {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        send(&s, &refs);
        let got = s.recv_string(0).unwrap().unwrap();
        assert!(got.starts_with(reply), "expected {reply:?}, got {got:?}");
    }
    let msgs = sub.collect(1, Duration::from_secs(10));
    assert_eq!(msgs.len(), 1, "{}", daemon.log());
    // The C-order buffer (z fastest) is published x fastest.
    let mut x_fastest = Vec::new();
    for k in 0..4 {
        for j in 0..3 {
            for i in 0..2 {
                x_fastest.push(((i * 3 + j) * 4 + k) as f32);
            }
        }
    }
    assert_eq!(msgs[0].f32_payload("data").unwrap(), x_fastest);
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let st = last_status(&session);
    assert_eq!(st["rejected"], 5, "{st}");
    for reason in ["bad_header", "payload_size", "bad_dtype", "too_large", "bad_frames"] {
        assert_eq!(st["errors"][reason], 1, "{reason}: {st}");
    }
    assert_eq!((st["received"].as_u64(), st["published"].as_u64()), (Some(1), Some(1)));
}

#[test]
fn native_zmq_takes_several_senders_c_and_f_order_and_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let (zp, sp) = (free_port(), free_port());
    let session = dir.path().join("s");
    let sub = Subscriber::connect(sp, "volume");
    let daemon = Daemon::start(
        &[
            "--ingest",
            &format!("zmq://127.0.0.1:{zp}"),
            "--publish",
            &format!("tcp://127.0.0.1:{sp}"),
            "--record",
            session.to_str().unwrap(),
            "--stop-after",
            "2",
            "--no-lsl",
            "--quiet",
            // Transport checks: volumes must come out exactly as sent.
            "--set",
            "motion.enabled=false",
            "--set",
            "glm.enabled=false",
        ],
        dir.path(),
    );
    let ctx = zmq::Context::new();
    let a = ctx.socket(zmq::PUSH).unwrap();
    let b = ctx.socket(zmq::PUSH).unwrap();
    for s in [&a, &b] {
        s.connect(&format!("tcp://127.0.0.1:{zp}")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    // A lone frame and a wrong-size payload, then one C-order and one F-order volume.
    send(&a, &[b"garbage"]);
    send(&b, &[header(0, "int16", [2, 1, 2]).as_bytes(), &[0u8; 3]]);
    let c_order: Vec<u8> = [1i16, 2, 3, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    send(&a, &[header(0, "int16", [2, 1, 2]).as_bytes(), &c_order]);
    let f_header = serde_json::json!({"volIdx": 1, "dtype": ">f8", "shape": [2, 1, 2], "order": "F",
        "affine": [[2,0,0,0],[0,2,0,0],[0,0,2,0],[0,0,0,1]], "TR": 1.0, "acq_time": 123.5, "run": "../x"});
    let f_order: Vec<u8> = [1f64, 3.0, 2.0, 4.0].iter().flat_map(|v| v.to_be_bytes()).collect();
    std::thread::sleep(Duration::from_millis(200));
    send(&b, &[f_header.to_string().as_bytes(), &f_order]);
    let msgs = sub.collect(2, Duration::from_secs(10));
    assert_eq!(msgs.len(), 2, "{}", daemon.log());
    for m in &msgs {
        assert_eq!(m.f32_payload("data").unwrap(), vec![1.0, 3.0, 2.0, 4.0], "{:?}", m.header);
    }
    let second: mirage_rt::topic::VolumeHeader =
        mirage_rt::topic::read(&msgs[1].topic, &msgs[1].header).unwrap();
    assert_eq!((second.acq_time, second.run.as_str()), (Some(123.5), "x"));
    let (status, log) = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let st = last_status(&session);
    assert_eq!(
        (st["errors"]["bad_frames"].as_u64(), st["errors"]["payload_size"].as_u64()),
        (Some(1), Some(1))
    );
}
