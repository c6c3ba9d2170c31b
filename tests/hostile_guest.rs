//! End-to-end: a test guest that breaks the virtio rules on purpose. The VMM
//! must stay up, the device must refuse, ignore or ask for a reset, the other
//! devices must keep working, and the disk image must not change.

mod common;

use common::{require_kvm, run_minimal_logging, stdout, TempFile};
use vmm_kit::testguest::parse_output;

const CASES: [(&str, &str); 18] = [
    ("queue-size-zero", "needs-reset"),
    ("queue-size-not-power-of-two", "needs-reset"),
    ("queue-size-above-max", "needs-reset"),
    ("queue-size-huge", "needs-reset"),
    ("ring-misaligned", "needs-reset"),
    ("ring-outside-ram", "needs-reset"),
    ("ring-in-mmio-gap", "needs-reset"),
    ("feature-never-offered", "refused"),
    ("no-version-1", "refused"),
    ("queue-writes-after-driver-ok", "ignored"),
    ("register-abuse", "ignored"),
    ("descriptor-loop", "needs-reset"),
    ("chain-longer-than-queue", "bounded"),
    ("avail-index-racing-ahead", "needs-reset"),
    ("head-out-of-range", "needs-reset"),
    ("buffer-outside-ram", "needs-reset"),
    ("buffer-in-mmio-gap", "needs-reset"),
    ("notify-storm", "survived"),
];

#[test]
fn hostile_driver_leaves_the_vmm_up_and_the_disk_unchanged() {
    require_kvm();
    let content = vec![0xabu8; 64 * 1024];
    let disk = TempFile::new("victim.img", &content);
    let out = run_minimal_logging(
        &[
            "--disk",
            disk.arg(),
            "--rng",
            "--cmdline",
            "testguest.run=hostile,hello",
        ],
        "warn",
    );
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        common::stderr(&out)
    );
    let reports = parse_output(&text);
    for (case, outcome) in CASES {
        let r = reports
            .iter()
            .find(|r| r.event == "hostile" && r.get("case") == Some(case))
            .unwrap_or_else(|| panic!("no report for {case}: {text}"));
        assert_eq!(r.get("outcome"), Some(outcome), "{case}");
    }
    let summary = reports
        .iter()
        .find(|r| r.event == "hostile" && r.words == ["ok"])
        .expect("summary");
    assert_eq!(summary.get_u64("cases"), Some(CASES.len() as u64));
    assert_eq!(
        summary.get("first_byte"),
        Some("0xab"),
        "the disk still reads its own data"
    );
    assert!(
        reports.iter().any(|r| r.event == "hello"),
        "the guest went on afterwards"
    );
    assert_eq!(
        std::fs::read(&disk.path).expect("image"),
        content,
        "no hostile request wrote the disk"
    );
    // Guest-caused warnings are rate limited.
    let warnings = common::stderr(&out)
        .lines()
        .filter(|l| l.contains("WARN"))
        .count();
    assert!(warnings <= 40, "{warnings} warning lines");
}

const IO_CASES: [(&str, &str); 13] = [
    ("net-tx-shorter-than-header", "dropped"),
    ("net-tx-oversized-frame", "dropped"),
    ("net-tx-bad-header", "dropped"),
    ("net-rx-buffer-shorter-than-header", "given-back"),
    ("net-tx-buffer-outside-ram", "needs-reset"),
    ("net-rx-buffer-outside-ram", "needs-reset"),
    ("net-tx-avail-index-racing-ahead", "needs-reset"),
    ("vsock-misaddressed", "reset"),
    ("vsock-not-a-stream", "reset"),
    ("vsock-data-without-connection", "reset"),
    ("vsock-shorter-than-header", "dropped"),
    ("vsock-length-past-buffer", "dropped"),
    ("vsock-credit-lie", "reset"),
];

/// The same hostile driver with a NIC (on a TAP in a namespace of the
/// test's own) and a vsock device (with a host echo service and a host
/// program that never reads): short, oversized and badly-headed frames,
/// buffers outside RAM, ring abuse, misaddressed packets and a credit lie.
/// Each is dropped, given back, reset or answered with DEVICE_NEEDS_RESET,
/// and the devices work afterwards.
#[test]
fn hostile_driver_on_a_nic_and_vsock_leaves_them_working() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    require_kvm();
    let ns = common::netns::NetNs::with_tap("hostile", "tap0", common::netns::HOST_IP);
    let disk = TempFile::new("victim.img", &vec![0xabu8; 64 * 1024]);
    let uds = disk.path.with_file_name("v.sock");
    let echo = UnixListener::bind(format!("{}_52", uds.display())).expect("echo socket");
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // Accepts and holds, never reads.
    let sink = UnixListener::bind(format!("{}_53", uds.display())).expect("sink socket");
    let held = std::thread::spawn(move || sink.accept().map(|(s, _)| s));
    let vsock = format!("cid=3,uds={}", uds.display());
    let net = format!("tap=tap0,mac={}", common::netns::GUEST_MAC);
    let out = ns
        .command(&common::minimal_bin())
        .args([
            "--disk",
            disk.arg(),
            "--rng",
            "--net",
            &net,
            "--vsock",
            &vsock,
            "--cmdline",
            "testguest.run=hostile,hello",
        ])
        .stdin(std::process::Stdio::null())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the VMM");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        common::stderr(&out)
    );
    let reports = parse_output(&text);
    for (case, outcome) in CASES.iter().chain(&IO_CASES) {
        let r = reports
            .iter()
            .find(|r| r.event == "hostile" && r.get("case") == Some(case))
            .unwrap_or_else(|| panic!("no report for {case}: {text}"));
        assert_eq!(r.get("outcome"), Some(*outcome), "{case}");
    }
    let summary = reports
        .iter()
        .find(|r| r.event == "hostile" && r.words == ["ok"])
        .expect("summary");
    assert_eq!(
        summary.get_u64("cases"),
        Some((CASES.len() + IO_CASES.len()) as u64)
    );
    assert_eq!(
        (summary.get("nic"), summary.get("vsock")),
        (Some("1"), Some("1"))
    );
    drop(held.join());
}
