//! Records the git commit the daemon is built from (`MIRAGE_COMMIT`, `unknown` outside a git
//! checkout): session folders and BIDS exports name it.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=MIRAGE_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        // A ref packed away has no file of its own: watching a missing path reruns every build.
        if let Some(r) = head.strip_prefix("ref: ").map(|r| format!(".git/{}", r.trim())) {
            if std::path::Path::new(&r).exists() {
                println!("cargo:rerun-if-changed={r}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
