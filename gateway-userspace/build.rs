//! Builds the eBPF object (gateway-ebpf) with the nightly toolchain and
//! bpf-linker, so the daemon binary embeds the programs it loads.
//! `cargo xtask setup` installs what this needs.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../gateway-ebpf").canonicalize()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");

    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "-Z",
        "build-std=core",
    ])
    .args(["--target", "bpfel-unknown-none", "--target-dir"])
    .arg(&target_dir)
    .current_dir(&ebpf_dir);
    // The outer build's compiler settings (clippy's wrapper, coverage flags,
    // the stable toolchain) must not leak into the nested nightly build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .context("running the nightly toolchain for the eBPF build (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!(
            "the eBPF build failed ({status}); `cargo xtask setup` installs rust-src and bpf-linker"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/gateway-ebpf");
    std::fs::copy(&obj, out_dir.join("gateway-ebpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}
