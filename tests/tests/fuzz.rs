//! A short smoke run of every fuzz target (fuzz/README.md) and a replay of every input that
//! once crashed one: the targets keep building, and old crashes stay fixed. The long runs
//! (10^7 executions each) are done by hand; their counts are in the issue notes.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGETS: &[&str] = &[
    "virtio_chain",
    "virtio_blk",
    "virtio_net",
    "virtio_pci",
    "pci_config",
    "legacy_ports",
    "device_state",
    "kernel_image",
    "boot_disk",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// `cargo +nightly fuzz ARGS` in fuzz/; fails with what is missing if it cannot run.
fn cargo_fuzz(args: &[&str]) -> std::process::Output {
    let out = Command::new("cargo")
        .current_dir(fuzz_dir())
        .args(["+nightly", "fuzz"])
        .args(args)
        .output()
        .expect("run cargo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("no such command: `fuzz`") && !err.contains("toolchain 'nightly'"),
        "the fuzz smoke test needs the nightly toolchain and cargo-fuzz \
         (scripts/install-test-deps installs cargo-fuzz): {err}"
    );
    out
}

#[test]
fn every_target_runs_and_every_old_crash_stays_fixed() {
    let build = cargo_fuzz(&["build", "-O"]);
    assert!(
        build.status.success(),
        "cargo fuzz build failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    for target in TARGETS {
        // Whatever is in the corpus first, then a few seconds of new inputs.
        let corpus = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&corpus).unwrap();
        let scratch =
            std::env::temp_dir().join(format!("rhyve-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let out = cargo_fuzz(&[
            "run",
            "-O",
            target,
            scratch.to_str().unwrap(),
            corpus.to_str().unwrap(),
            "--",
            "-max_total_time=8",
            "-max_len=65536",
        ]);
        let _ = std::fs::remove_dir_all(&scratch);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{target} failed:\n{log}");
        assert!(log.contains("Done"), "{target} did not run:\n{log}");
        let regressions = fuzz_dir().join("regressions").join(target);
        for input in std::fs::read_dir(&regressions).into_iter().flatten() {
            let input = input.unwrap().path();
            let out = cargo_fuzz(&["run", "-O", target, input.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{target}: regression {} crashes again:\n{}",
                input.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
