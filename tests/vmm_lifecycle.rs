//! End-to-end: the `Vmm` library API and the reference VMM's signal handling,
//! on the test guest under KVM.

mod common;

use std::io;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{minimal_bin, require_kvm, SharedBuf};
use vmm_kit::core::{
    HostIo, KernelSource, RunningVm, StopCause, VmConfig, VmEvent, VmExit, VmHandle, Vmm,
};
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
        HostIo::serial(Box::new(out.clone())),
    )
    .expect("build");
    let boot = vmm.boot_setup().expect("a booted VM has a boot setup");
    assert_eq!(boot.cpu.rip, boot.kernel.pvh_entry.expect("pvh note"));
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

/// A VM of the spinning guest, started and seen spinning, with its handle;
/// `before_start` looks at the handle while the VM is built but not started.
fn spinning(before_start: impl FnOnce(&VmHandle)) -> (VmHandle, RunningVm) {
    require_kvm();
    let out = SharedBuf::default();
    let vmm = Vmm::new(
        &config("testguest.run=spin"),
        HostIo::serial(Box::new(out.clone())),
    )
    .expect("build");
    let handle = vmm.handle();
    before_start(&handle);
    let running = vmm.start().expect("start");
    out.wait_for("testguest: spin", Duration::from_secs(30));
    (handle, running)
}

#[test]
fn a_handle_pauses_resumes_and_stops_a_spinning_guest_from_another_thread() {
    let (handle, running) = spinning(|h| {
        assert!(h.pause().is_err(), "a VM that has not started cannot pause");
    });
    let controller = std::thread::spawn(move || {
        handle.pause().expect("pause");
        assert!(handle.is_paused());
        handle.pause().expect("a second pause is a no-op");
        handle.resume().expect("resume");
        assert!(!handle.is_paused());
        handle.stop();
    });
    let exit = running.wait().expect("run");
    controller.join().expect("controller thread");
    assert_eq!(exit, VmExit::Stopped(StopCause::Requested));
    assert_eq!(exit.exit_code(), 7);
}

#[test]
fn an_event_ends_a_paused_vm_which_hands_back_its_vcpus() {
    let (handle, running) = spinning(|_| {});
    handle.pause().expect("pause");
    let events = handle.events();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        events.send(VmEvent::GuestStatus(5));
    });
    let (exit, stopped) = running.wait_and_keep().expect("run");
    assert_eq!(exit, VmExit::GuestStatus(5), "an event ends a paused VM");
    assert!(handle.pause().is_err(), "an ended VM cannot pause");
    let regs = stopped.vcpus[0].fd().get_regs().expect("regs");
    let sregs = stopped.vcpus[0].fd().get_sregs().expect("sregs");
    assert_eq!(sregs.cs.selector & 3, 3, "stopped in the CPL3 spin loop");
    assert_ne!(regs.rip, 0);
}

/// Starts the reference VMM on the spinning guest with `extra` flags and
/// returns it once the guest spins.
fn spinning_reference_vmm(extra: &[&str]) -> std::process::Child {
    require_kvm();
    let mut child = Command::new(minimal_bin())
        .args(["--cmdline", "testguest.run=spin"])
        .args(extra)
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
    child
}

#[test]
fn sigint_sigterm_and_sighup_stop_the_reference_vmm_which_ends_by_that_signal() {
    use std::os::unix::process::ExitStatusExt;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut child = spinning_reference_vmm(&[]);
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0);
        let start = Instant::now();
        let status = child.wait().expect("wait");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the stop is bounded"
        );
        assert_eq!(status.signal(), Some(signal), "status {status:?}");
        let mut err = String::new();
        io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("stderr");
        assert!(!err.contains("panicked"), "{err}");
    }
}
