//! Builds veil's test guest, the probe (resources/guests/probe), and hands
//! its ELF to the veil crate as `VEIL_PROBE_ELF` (see src/probe_image.rs).
//!
//! The probe is a freestanding x86-64 image with its own cargo workspace,
//! profiles and `.cargo/config.toml`, so it is built by a separate cargo
//! run, from its own directory (where that config is read), into
//! `$OUT_DIR/probe-target`, with everything this build's cargo told us
//! through the environment removed first: none of it applies to the probe.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PROBE_DIR: &str = "resources/guests/probe";
const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Whether a variable of the outer build must not reach the inner cargo.
fn leaks_outer_build(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    // CARGO_HOME says where the registry and the user's config live: keep.
    if name == "CARGO_HOME" {
        return false;
    }
    // Everything cargo sets for build scripts (CARGO_PKG_*, CARGO_CFG_*,
    // CARGO_MANIFEST_*, CARGO_ENCODED_RUSTFLAGS, CARGO_MAKEFLAGS, ...) and
    // every CARGO_* setting (CARGO_TARGET_DIR, CARGO_BUILD_TARGET,
    // CARGO_BUILD_RUSTFLAGS, CARGO_PROFILE_*, CARGO_TARGET_<triple>_*, ...),
    // and cargo's internal ones (__CARGO_*).
    if name.starts_with("CARGO") || name.starts_with("__CARGO") {
        return true;
    }
    matches!(
        name,
        // Compiler flags and wrappers (`cargo clippy` sets
        // RUSTC_WORKSPACE_WRAPPER and CLIPPY_ARGS; sccache & co. RUSTC_WRAPPER).
        "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "RUSTC_WRAPPER"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "CLIPPY_ARGS"
            | "CLIPPY_CONF_DIR"
            // The jobserver of the outer build.
            | "MAKEFLAGS"
            | "MFLAGS"
            // Build-script inputs describing the outer build.
            | "TARGET"
            | "HOST"
            | "OUT_DIR"
            | "OPT_LEVEL"
            | "PROFILE"
            | "DEBUG"
            | "NUM_JOBS"
    )
}

/// Files and directories whose change must rebuild the probe.
fn watch(dir: &Path) {
    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(path).display());
    }
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let probe_dir = manifest_dir.join(PROBE_DIR);
    let target_dir = out_dir.join("probe-target");
    println!("cargo:rerun-if-changed=build.rs");
    watch(&probe_dir);

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&probe_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(probe_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(PROBE_TARGET)
        .arg("--target-dir")
        .arg(&target_dir)
        // Our stdout is read by cargo as build-script directives: keep the
        // inner cargo's output on stderr, which cargo shows if we fail.
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit());
    for (name, _) in env::vars_os() {
        if leaks_outer_build(&name) {
            cmd.env_remove(&name);
        }
    }

    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    if !status.success() {
        eprintln!("building the probe ({}) failed: {status}", probe_dir.display());
        std::process::exit(1);
    }

    let elf = target_dir.join(PROBE_TARGET).join("release").join("veil-probe");
    assert!(elf.is_file(), "the probe build did not produce {}", elf.display());
    println!("cargo:rustc-env=VEIL_PROBE_ELF={}", elf.display());
}
