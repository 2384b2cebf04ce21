//! Builds the test guests (the separate guests/ workspace) and packages their images into
//! OUT_DIR: testguest.bzimage and testguest.pvh. The paths reach the library through env!().

#[path = "src/image.rs"]
#[allow(dead_code)] // the library uses the rest of it
mod image;

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let guests = manifest.parent().unwrap().join("guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let target_dir = out.join("guests-target");

    for p in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "testguest",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(p).display());
    }
    println!("cargo:rerun-if-changed=src/image.rs");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--offline", "--manifest-path"])
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The guests are freestanding: the outer build's flags, target and wrappers (clippy's
    // RUSTC_WORKSPACE_WRAPPER included) would break or lint them. guests/.cargo/config.toml
    // carries their own flags.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "RUSTFLAGS"
            || k == "CARGO_ENCODED_RUSTFLAGS"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "CLIPPY_ARGS"
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_TARGET_")
            || k.starts_with("CARGO_PROFILE_")
        {
            cmd.env_remove(&*k);
        }
    }
    let res = cmd.output().expect("running cargo for guests/");
    if !res.status.success() {
        panic!(
            "building guests/ failed ({}):\n{}{}",
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
    }

    let elf_path = target_dir.join("x86_64-unknown-linux-gnu/release/testguest");
    let elf = std::fs::read(&elf_path).expect("reading the testguest ELF");
    let bz = image::bzimage(&elf).unwrap_or_else(|e| panic!("{}: {e}", elf_path.display()));
    image::pvh_entry(&elf).unwrap_or_else(|e| panic!("{}: {e}", elf_path.display()));
    write(
        &out.join("testguest.bzimage"),
        &bz,
        "RHYVE_TESTGUEST_BZIMAGE",
    );
    write(&out.join("testguest.pvh"), &elf, "RHYVE_TESTGUEST_PVH");
}

fn write(path: &Path, data: &[u8], env: &str) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("cargo:rustc-env={env}={}", path.display());
}
