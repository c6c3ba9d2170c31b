//! End-to-end: the `Vmm` library API and the reference VMM's signal handling,
//! on the test guest under KVM.

mod common;

use std::io;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{minimal_bin, require_kvm, SharedBuf};
use vmm_kit::core::{KernelSource, VmConfig, VmExit, Vmm};
use vmm_kit::testguest::parse_output;

fn config(cmdline: &str) -> VmConfig {
    VmConfig {
        kernel: KernelSource::Bytes(vmm_kit::testguest::IMAGE),
        cmdline: cmdline.to_string(),
        mem_mib: 64,
        ..VmConfig::default()
    }
}

#[test]
fn library_vmm_runs_the_guest_and_returns_its_status() {
    require_kvm();
    let out = SharedBuf::default();
    let vmm = Vmm::new(
        &config("testguest.run=hello,exit testguest.exit=7"),
        Box::new(out.clone()),
    )
    .expect("build");
    assert_eq!(
        vmm.boot_setup().cpu.rip,
        vmm.boot_setup().kernel.pvh_entry.expect("pvh note")
    );
    assert_eq!(vmm.run().expect("run"), VmExit::GuestStatus(7));
    let reports = parse_output(&out.text());
    assert_eq!(
        reports
            .iter()
            .find(|r| r.event == "hello")
            .and_then(|r| r.get_u64("mem_mib")),
        Some(64)
    );
}

#[test]
fn stop_handle_ends_a_spinning_guest() {
    require_kvm();
    let out = SharedBuf::default();
    let vmm = Vmm::new(&config("testguest.run=spin"), Box::new(out.clone())).expect("build");
    let stop = vmm.stop_handle();
    let runner = std::thread::spawn(move || vmm.run());
    out.wait_for("testguest: spin", Duration::from_secs(30));
    stop.stop();
    let exit = runner.join().expect("run thread").expect("run");
    assert_eq!(exit, VmExit::Interrupted);
    assert_eq!(exit.exit_code(), 130);
}

#[test]
fn ctrl_c_stops_the_reference_vmm_with_status_130() {
    require_kvm();
    let mut child = Command::new(minimal_bin())
        .args(["--cmdline", "testguest.run=spin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the reference VMM");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("testguest: spin") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest never spun: {}",
            String::from_utf8_lossy(&seen)
        );
        let n = io::Read::read(&mut stdout, &mut buf).expect("read stdout");
        assert!(n > 0, "VMM ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: sending SIGINT to our own child process.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "status {status:?}");
}
