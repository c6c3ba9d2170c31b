//! More than one vCPU: the guest finds them all in the ACPI tables through
//! both boot protocols, the VM pauses, resumes and stops with every vCPU,
//! and vCPU counts that cannot work are refused.

mod common;

use std::time::Duration;

use common::{assert_clean_failure, require_kvm, run_minimal, stdout, SharedBuf};
use vmm_kit::core::{HostIo, KernelSource, StopCause, VmConfig, VmExit, Vmm};
use vmm_kit::kvm_bindings;
use vmm_kit::testguest::parse_output;

/// Runs `scenario` then exit 0 with `vcpus` vCPUs through each boot
/// protocol, with `extra` flags, and hands each run's report of `scenario`
/// to `check`.
fn for_each_protocol(
    vcpus: u64,
    scenario: &str,
    extra: &[&str],
    check: impl Fn(&str, &vmm_kit::testguest::Report),
) {
    for protocol in ["pvh", "linux64"] {
        let n = vcpus.to_string();
        let cmdline = format!("testguest.run={scenario},exit testguest.exit=0");
        let mut args = vec![
            "--vcpus",
            &n,
            "--boot-protocol",
            protocol,
            "--cmdline",
            &cmdline,
        ];
        args.extend_from_slice(extra);
        let out = run_minimal(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{vcpus} {protocol}: {}",
            stdout(&out)
        );
        let report = parse_output(&stdout(&out))
            .into_iter()
            .find(|r| r.event == scenario)
            .unwrap_or_else(|| panic!("no {scenario} report: {}", stdout(&out)));
        check(protocol, &report);
    }
}

#[test]
fn the_guest_finds_every_vcpu_and_device_in_the_acpi_tables() {
    require_kvm();
    let disk = common::TempFile::new("smp.img", &[0u8; 4096]);
    let ro = format!("{},ro", disk.arg());
    for vcpus in [1, 2, 4, 64] {
        for_each_protocol(
            vcpus,
            "acpi",
            &["--rng", "--disk", &ro],
            |protocol, acpi| {
                assert_eq!(acpi.get_u64("cpus"), Some(vcpus), "{protocol}");
                assert_eq!(acpi.get_u64("ioapics"), Some(1));
                assert_eq!(acpi.get_u64("virtio_mmio"), Some(2), "the disk and the rng");
                assert_eq!(acpi.get_u64("serial"), Some(1), "COM1");
            },
        );
    }
}

#[test]
fn every_vcpu_pauses_resumes_and_stops_together() {
    require_kvm();
    let out = SharedBuf::default();
    let config = VmConfig {
        kernel: KernelSource::Bytes(vmm_kit::testguest::IMAGE),
        cmdline: "testguest.run=spin".into(),
        mem_mib: 64,
        vcpus: 8,
        ..VmConfig::default()
    };
    let vmm = Vmm::new(&config, HostIo::serial(Box::new(out.clone()))).expect("build");
    let handle = vmm.handle();
    let running = vmm.start().expect("start");
    out.wait_for("testguest: spin", Duration::from_secs(30));
    handle.pause().expect("pause all eight");
    handle.resume().expect("resume all eight");
    handle.stop();
    let (exit, stopped) = running.wait_and_keep().expect("run");
    assert_eq!(exit, VmExit::Stopped(StopCause::Requested));
    assert_eq!(
        stopped.vcpus.len(),
        8,
        "every vCPU thread ended and was joined"
    );
    // The application processors were never started by this guest: KVM
    // still holds them waiting for INIT/SIPI.
    for v in &stopped.vcpus[1..] {
        let mp = v.fd().get_mp_state().expect("mp state");
        assert_ne!(
            mp.mp_state,
            kvm_bindings::KVM_MP_STATE_RUNNABLE,
            "vCPU {}",
            v.id()
        );
    }
}

#[test]
fn vcpu_counts_that_cannot_work_are_refused() {
    assert_clean_failure(&run_minimal(&["--vcpus", "0"]), "at least one vCPU");
    assert_clean_failure(&run_minimal(&["--vcpus", "255"]), "at most 254");
    let out = run_minimal(&["--vcpus", "300"]);
    assert_eq!(out.status.code(), Some(3), "not even a u8");
}

#[test]
fn the_guest_starts_its_application_processors_which_all_run_at_once() {
    require_kvm();
    for vcpus in [1u64, 2, 4, 64] {
        for_each_protocol(vcpus, "smp", &[], |protocol, smp| {
            assert_eq!(smp.get_u64("cpus"), Some(vcpus), "{protocol}");
            assert_eq!(smp.get_u64("started"), Some(vcpus - 1), "every AP ran");
            assert_eq!(smp.get_u64("together"), Some(vcpus - 1), "all at once");
            assert_eq!(smp.get("apic_ids"), Some("ok"), "each with its own APIC ID");
        });
    }
}

#[test]
fn starting_the_processors_again_leaves_the_vmm_working() {
    require_kvm();
    // The second round sends INIT to running (halted) APs and two more
    // startup IPIs: KVM resets them and they start over.
    let out = run_minimal(&[
        "--vcpus",
        "4",
        "--cmdline",
        "testguest.run=smp,smp,hello,exit testguest.exit=0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let reports = parse_output(&stdout(&out));
    let rounds: Vec<_> = reports.iter().filter(|r| r.event == "smp").collect();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert_eq!(r.get_u64("together"), Some(3));
    }
    assert!(reports.iter().any(|r| r.event == "hello"));
}

#[test]
fn devices_can_be_left_off_the_command_line_and_still_be_found_in_acpi() {
    require_kvm();
    let out = run_minimal(&[
        "--rng",
        "--no-virtio-cmdline",
        "--cmdline",
        "testguest.run=acpi,probe,exit testguest.exit=0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let reports = parse_output(&stdout(&out));
    let find = |e: &str| reports.iter().find(|r| r.event == e).expect("report");
    assert_eq!(find("acpi").get_u64("virtio_mmio"), Some(1), "in the DSDT");
    let boot = find("boot");
    assert_eq!(
        boot.get_u64("virtio_entries"),
        Some(0),
        "not on the command line"
    );
}
