//! Builds the test guest (`guest/main.rs`) with the same rustc that builds this
//! crate, for the host's x86_64 Linux target, as a freestanding static ELF:
//! no std, no libc, `panic=abort`, linked at 1 MiB by `guest/link.ld`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest = manifest.join("guest");
    println!("cargo:rerun-if-changed={}", guest.display());
    for f in [
        "main.rs",
        "boot.rs",
        "bootinfo.rs",
        "cmdline.rs",
        "io.rs",
        "mem.rs",
        "scenarios.rs",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out.join("testguest.elf");
    let linker_script = guest.join("link.ld");
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "testguest",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "debuginfo=0",
            "-C",
            "strip=debuginfo",
            "-C",
            "codegen-units=1",
        ])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", linker_script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        // The guest is not part of the host build: keep host flags away.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .arg("-o")
        .arg(&elf)
        .arg(guest.join("main.rs"))
        .status()
        .expect("cannot run rustc to build the test guest");
    assert!(status.success(), "building the test guest failed: {status}");
}
