//! MindEye2 checkpoints: `tools/export_mindeye2.py` turns one into a model folder and `mirage
//! decode` runs it; every output equals PyTorch's (Debian's `python3-torch`) on a checkpoint made
//! from the published layer list, batch 1 and batch 3.

mod common;

use std::time::Duration;

use common::{close, decode_cmd, npy, run, run_with_timeout, torch_python};

#[test]
fn an_exported_mindeye2_checkpoint_decodes_as_pytorch_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(torch_python("tests/python/mindeye2_fixture.py").arg(d));
    let model = d.join("model");
    // Subject 1's ridge (subject 0's reads another number of voxels).
    let out = run(torch_python("tools/export_mindeye2.py")
        .arg(d.join("last.pth"))
        .arg(&model)
        .args(["--subject", "1"]));
    assert!(out.contains("\"clip_tokens\": 4") && out.contains("\"n_voxels\": 200"), "{out}");

    let (shape, betas) = npy(&d.join("betas.npy"));
    mirage_rt::io::npy::write_npy(d.join("betas_1.npy"), &[1, shape[1]], &betas[..shape[1]]).unwrap();
    for (input, suffix) in [("betas.npy", ""), ("betas_1.npy", "_1")] {
        let pred = d.join(format!("pred{suffix}"));
        run(&mut decode_cmd(&model, &d.join(input), &pred));
        for name in ["backbone", "clip_voxels"] {
            let (ours_shape, ours) = npy(&pred.join(format!("{name}.npy")));
            let (want_shape, want) = npy(&d.join(format!("{name}{suffix}.npy")));
            assert_eq!(ours_shape, want_shape, "{name}{suffix}");
            close(&ours, &want, 1e-4, &format!("{name}{suffix}"));
        }
    }

    // The wrong subject's ridge, a missing one, and betas of another size are clear errors.
    let (status, out) = run_with_timeout(
        &mut decode_cmd(&model, &d.join("backbone.npy"), &d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("betas must be 2-D"), "{out}");
    let (status, out) = run_with_timeout(
        torch_python("tools/export_mindeye2.py")
            .arg(d.join("last.pth"))
            .arg(d.join("m2"))
            .args(["--subject", "7"]),
        Duration::from_secs(120),
    );
    assert!(!status.success() && out.contains("no ridge.linears.7.weight"), "{out}");
    let (status, out) = run_with_timeout(
        torch_python("tools/export_mindeye2.py")
            .arg(d.join("last.pth"))
            .arg(d.join("m0"))
            .args(["--subject", "0"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}");
    let (status, out) = run_with_timeout(
        &mut decode_cmd(&d.join("m0"), &d.join("betas.npy"), &d.join("x")),
        Duration::from_secs(60),
    );
    assert!(!status.success() && out.contains("200 voxels, the model takes 237"), "{out}");
}
