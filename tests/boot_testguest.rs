//! End-to-end: the reference VMM boots the test guest under KVM through both
//! boot protocols, and the guest's report and exit status come back.

mod common;

use common::{guest_status, require_kvm, run_minimal, stdout};
use vmm_kit::testguest::{exit_status, parse_output, Report};

/// RAM the guest should find in its memory map for `mib` MiB: everything but
/// the EBDA and BIOS area between 0x9fc00 and 1 MiB.
fn expected_ram_bytes(mib: u64) -> u64 {
    (mib << 20) - (0x10_0000 - 0x9fc00)
}

fn event<'a>(reports: &'a [Report], name: &str) -> &'a Report {
    reports
        .iter()
        .find(|r| r.event == name)
        .unwrap_or_else(|| panic!("no {name:?} report in {reports:?}"))
}

fn boot_hello(protocol: &str, mem: u64) {
    require_kvm();
    let mem_arg = mem.to_string();
    let out = run_minimal(&["--boot-protocol", protocol, "--mem", &mem_arg]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {text}\nstderr: {}",
        common::stderr(&out)
    );
    let reports = parse_output(&text);
    let boot = event(&reports, "boot");
    assert_eq!(boot.get("cpl"), Some("3"), "scenarios run at CPL3");
    let hello = event(&reports, "hello");
    assert_eq!(hello.get("proto"), Some(protocol));
    assert_eq!(hello.get_u64("mem_mib"), Some(mem));
    assert_eq!(hello.get_u64("ram_bytes"), Some(expected_ram_bytes(mem)));
    assert_eq!(event(&reports, "done").get_u64("status"), Some(0));
}

#[test]
fn testguest_says_hello_through_pvh() {
    boot_hello("pvh", 128);
}

#[test]
fn testguest_says_hello_through_the_linux_64bit_protocol() {
    boot_hello("linux64", 128);
}

#[test]
fn testguest_sees_ram_above_4g_split_around_the_mmio_gap() {
    require_kvm();
    let out = run_minimal(&["--mem", "4096", "--memory-backing", "memfd"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let reports = parse_output(&text);
    let hello = event(&reports, "hello");
    assert_eq!(hello.get_u64("ram_bytes"), Some(expected_ram_bytes(4096)));
    assert_eq!(
        hello.get_u64("ram_top"),
        Some((1 << 32) + (1 << 30)),
        "1 GiB sits above 4 GiB"
    );
    assert_eq!(hello.get_u64("map_entries"), Some(4));
}

#[test]
fn auto_protocol_prefers_pvh_for_the_test_guest() {
    require_kvm();
    let out = run_minimal(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        event(&parse_output(&stdout(&out)), "hello").get("proto"),
        Some("pvh")
    );
}

#[test]
fn guest_exit_status_becomes_the_vmm_exit_status_in_both_protocols() {
    require_kvm();
    for protocol in ["pvh", "linux64"] {
        let out = run_minimal(&[
            "--boot-protocol",
            protocol,
            "--cmdline",
            "testguest.run=hello,exit testguest.exit=42",
        ]);
        assert_eq!(
            out.status.code(),
            guest_status(42),
            "{protocol}: {}",
            stdout(&out)
        );
        let reports = parse_output(&stdout(&out));
        assert_eq!(event(&reports, "exit").get_u64("status"), Some(42));
        assert!(
            reports.iter().all(|r| r.event != "done"),
            "exit ends the guest at once"
        );
    }
}

#[test]
fn unknown_scenario_fails_with_its_name() {
    require_kvm();
    let out = run_minimal(&["--cmdline", "testguest.run=hello,no-such-thing"]);
    assert_eq!(
        out.status.code(),
        guest_status(exit_status::UNKNOWN_SCENARIO)
    );
    let reports = parse_output(&stdout(&out));
    let err = event(&reports, "error");
    assert!(
        err.words.iter().any(|w| w.contains("no-such-thing")),
        "{err:?}"
    );
    assert!(
        reports.iter().any(|r| r.event == "hello"),
        "earlier scenarios still ran"
    );
}

#[test]
fn guest_reset_through_the_i8042_ends_the_vm_cleanly() {
    require_kvm();
    let out = run_minimal(&["--cmdline", "testguest.run=reset"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert!(parse_output(&stdout(&out))
        .iter()
        .any(|r| r.event == "reset"));
}

#[test]
fn exit_port_can_be_moved() {
    require_kvm();
    let out = run_minimal(&[
        "--exit-port",
        "0x501",
        "--cmdline",
        "testguest.exit_port=0x501 testguest.run=exit testguest.exit=9",
    ]);
    assert_eq!(out.status.code(), guest_status(9), "{}", stdout(&out));
}

#[test]
fn no_seccomp_runs_the_same_guest() {
    require_kvm();
    let out = run_minimal(&[
        "--no-seccomp",
        "--cmdline",
        "testguest.run=hello,exit testguest.exit=11",
    ]);
    assert_eq!(
        out.status.code(),
        guest_status(11),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn bench_scenarios_report_cycles_per_exit() {
    require_kvm();
    let out = run_minimal(&[
        "--cmdline",
        "testguest.run=bench-pio,bench-mmio testguest.bench_iters=200",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let reports = parse_output(&stdout(&out));
    for name in ["bench-pio", "bench-mmio"] {
        let r = event(&reports, name);
        assert_eq!(r.get_u64("iters"), Some(200));
        let per_op = r.get_u64("cycles_per_op").expect("cycles_per_op");
        assert!(
            per_op > 0 && per_op * 200 <= r.get_u64("cycles").expect("cycles"),
            "{r:?}"
        );
    }
}

#[test]
fn debugcon_shows_the_boot_marker_of_the_first_instruction() {
    require_kvm();
    let out = run_minimal(&["--debugcon"]);
    assert_eq!(out.status.code(), Some(0));
    // The marker is the debug console's only byte; log lines (a host
    // warning, say) may come before it on the same stderr.
    let err = common::stderr(&out);
    let console: String = err.lines().filter(|l| !l.starts_with('[')).collect();
    assert!(
        console.starts_with('!') && console.chars().all(|c| c == '!'),
        "{err}"
    );
    let quiet = run_minimal(&[]);
    assert!(
        !common::stderr(&quiet).contains('!'),
        "no debug console unless asked"
    );
}
