//! mirage-rt's copy of zmq-sys 0.12.0: the same vendored libzmq, linked to the system's
//! libsodium when `pkg-config` finds it so that ZeroMQ's CURVE is available; without it libzmq
//! is built as upstream's default does (no CURVE), and the daemon says so when a config asks
//! for CURVE.

use std::process::Command;

/// `pkg-config --variable=NAME libsodium`, when pkg-config and libsodium's `.pc` are present.
fn sodium_variable(name: &str) -> Option<String> {
    let out = Command::new("pkg-config").args([&format!("--variable={name}"), "libsodium"]).output().ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !value.is_empty()).then_some(value)
}

pub fn configure() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let sodium = match (sodium_variable("libdir"), sodium_variable("includedir")) {
        // libzmq links libsodium statically: the archive must be there.
        (Some(lib), Some(include)) if std::path::Path::new(&lib).join("libsodium.a").exists() => {
            Some((lib, include))
        }
        _ => {
            println!(
                "cargo:warning=libsodium (libsodium-dev) not found by pkg-config: libzmq is built \
                 without CURVE"
            );
            None
        }
    };
    // libzmq's own compiler warnings are upstream's; cargo would replay them on every build of
    // a path dependency.
    for var in ["CFLAGS", "CXXFLAGS"] {
        let flags = std::env::var(var).unwrap_or_default();
        std::env::set_var(var, format!("{flags} -w").trim());
    }
    let mut build = zeromq_src::Build::new();
    if let Some((lib, include)) = &sodium {
        build.with_libsodium(Some(zeromq_src::LibLocation::new(lib, include)));
    }
    build.build();
    if let Some((lib, _)) = sodium {
        // zeromq-src prints its search path Debug-quoted, which rustc does not read.
        println!("cargo:rustc-link-search=native={lib}");
    }
}

fn main() {
    configure()
}
