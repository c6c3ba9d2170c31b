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
