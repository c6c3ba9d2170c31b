//! End-to-end: the test guest drives virtio-blk, virtio-rng and
//! virtio-console on the virtio-mmio transport under KVM, polled and
//! interrupt driven; the host checks the guest's reports and the files.

mod common;

use common::{
    assert_clean_failure, require_kvm, run_minimal, run_minimal_logging, stdout, TempFile,
};
use vmm_kit::testguest::shared::{
    blk_pattern_byte, BLK_PATTERN_LEN, BLK_PATTERN_SECTOR, CONSOLE_MESSAGE,
};
use vmm_kit::testguest::{parse_output, Report};

fn reports_of(out: &std::process::Output) -> Vec<Report> {
    let text = stdout(out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{text}\nstderr:\n{}",
        common::stderr(out)
    );
    parse_output(&text)
}

fn find<'a>(reports: &'a [Report], event: &str, key: &str, value: &str) -> &'a Report {
    reports
        .iter()
        .find(|r| r.event == event && r.get(key) == Some(value))
        .unwrap_or_else(|| panic!("no {event} report with {key}={value} in {reports:?}"))
}

fn blk_round_trip(protocol: &str) {
    require_kvm();
    let rw = TempFile::new("rw.img", &vec![0u8; 1 << 20]);
    let ro_content = vec![0xabu8; 64 * 1024];
    let ro = TempFile::new("ro.img", &ro_content);
    let out = run_minimal(&[
        "--boot-protocol",
        protocol,
        "--disk",
        &format!("{},id=data-disk", rw.arg()),
        "--disk",
        &format!("{},ro,id=golden", ro.arg()),
        "--cmdline",
        "testguest.run=blk,blk-irq",
    ]);
    let reports = reports_of(&out);
    for mode in ["poll", "irq"] {
        let summary = find(&reports, "blk", "mode", mode);
        assert_eq!(summary.words, vec!["ok"], "{summary:?}");
        assert_eq!(summary.get_u64("devices"), Some(2));
    }
    let rw_report = find(&reports, "blk", "id", "data-disk");
    assert_eq!(rw_report.get_u64("capacity"), Some(2048));
    assert_eq!(rw_report.get("read"), Some("ok"));
    assert_eq!(rw_report.get("beyond"), Some("ioerr"));
    let ro_report = find(&reports, "blk", "id", "golden");
    assert_eq!(ro_report.get_u64("capacity"), Some(128));
    assert_eq!(ro_report.get("write"), Some("ioerr"));

    // The last run (interrupt driven) left its pattern on the writable disk,
    // and nothing else changed.
    let image = std::fs::read(&rw.path).expect("image");
    let at = (BLK_PATTERN_SECTOR * 512) as usize;
    let expected: Vec<u8> = (0..BLK_PATTERN_LEN)
        .map(|i| blk_pattern_byte(i, 1))
        .collect();
    assert_eq!(&image[at..at + BLK_PATTERN_LEN], &expected[..]);
    assert!(image[..at]
        .iter()
        .chain(&image[at + BLK_PATTERN_LEN..])
        .all(|&b| b == 0));
    assert_eq!(
        std::fs::read(&ro.path).expect("ro image"),
        ro_content,
        "the read-only disk is unchanged"
    );
}

#[test]
fn blk_reads_writes_flushes_and_refuses_through_pvh() {
    blk_round_trip("pvh");
}

#[test]
fn blk_reads_writes_flushes_and_refuses_through_linux64() {
    blk_round_trip("linux64");
}

#[test]
fn rng_answers_polled_and_interrupt_driven() {
    require_kvm();
    let reports = reports_of(&run_minimal(&[
        "--rng",
        "--cmdline",
        "testguest.run=rng,rng-irq",
    ]));
    for mode in ["poll", "irq"] {
        assert_eq!(find(&reports, "rng", "mode", mode).words, vec!["ok"]);
    }
}

#[test]
fn console_output_reaches_a_file_polled_and_interrupt_driven() {
    require_kvm();
    let out_file = TempFile::new("console.out", b"stale content to be truncated");
    let console = format!("file={}", out_file.arg());
    let reports = reports_of(&run_minimal(&[
        "--console",
        &console,
        "--cmdline",
        "testguest.run=console,console-irq",
    ]));
    for mode in ["poll", "irq"] {
        assert_eq!(find(&reports, "console", "mode", mode).words, vec!["ok"]);
    }
    let written = std::fs::read_to_string(&out_file.path).expect("console output");
    assert_eq!(written, CONSOLE_MESSAGE.repeat(2));
}

#[test]
fn console_on_stdout_shares_it_with_the_serial_port() {
    require_kvm();
    let out = run_minimal(&[
        "--console",
        "stdout",
        "--cmdline",
        "testguest.run=console-irq",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(CONSOLE_MESSAGE), "{text}");
}

#[test]
fn all_devices_together_notified_through_ioeventfds() {
    require_kvm();
    let disk = TempFile::new("d.img", &vec![0u8; 64 * 1024]);
    let console_out = TempFile::new("c.out", b"");
    let args = [
        "--disk",
        disk.arg(),
        "--rng",
        "--console",
        &format!("file={}", console_out.arg()),
        "--cmdline",
        "testguest.run=blk-irq,rng-irq,console-irq,rng,blk",
    ];
    let out = run_minimal_logging(&args, "vmm_devices=trace");
    let reports = reports_of(&out);
    assert_eq!(
        reports.iter().filter(|r| r.words == ["ok"]).count(),
        5,
        "{reports:?}"
    );
    // Every queue notification went to KVM's ioeventfd; none exited to the
    // transport in userspace.
    let log = common::stderr(&out);
    assert!(!log.contains("notified through the transport"), "{log}");
}

#[test]
fn scenarios_without_their_device_fail_clearly() {
    require_kvm();
    let out = run_minimal(&["--cmdline", "testguest.run=blk"]);
    assert_eq!(
        out.status.code(),
        common::guest_status(vmm_kit::testguest::exit_status::FAILED)
    );
    assert!(stdout(&out).contains("error blk no device found"));
}

#[test]
fn missing_or_directory_disks_and_bad_disk_options_are_refused() {
    assert_clean_failure(
        &run_minimal(&["--disk", "/nonexistent/disk.img"]),
        "cannot open disk image",
    );
    let f = TempFile::new("x", b"");
    let dir = f.path.parent().expect("dir").to_str().expect("utf-8");
    assert_clean_failure(&run_minimal(&["--disk", dir]), "is a directory");
    for bad in ["img,rw", "img,id=123456789012345678901", ",ro"] {
        let out = run_minimal(&["--disk", bad]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{bad}: {}",
            common::stderr(&out)
        );
    }
    let out = run_minimal(&["--console", "tty"]);
    assert_eq!(out.status.code(), Some(3));
    assert_clean_failure(
        &run_minimal(&["--console", "file=/nonexistent/dir/console.out"]),
        "cannot open console output",
    );
}

#[test]
fn virtio_round_trip_benchmarks_report_cycles() {
    require_kvm();
    let out = run_minimal(&[
        "--rng",
        "--cmdline",
        "testguest.run=bench-virtio,bench-virtio-irq testguest.bench_iters=50",
    ]);
    let reports = reports_of(&out);
    for name in ["bench-virtio", "bench-virtio-irq"] {
        let r = reports
            .iter()
            .find(|r| r.event == name && r.get("cycles_per_op").is_some())
            .unwrap_or_else(|| panic!("no {name} figure in {reports:?}"));
        assert_eq!(r.get_u64("iters"), Some(50));
        assert!(r.get_u64("cycles_per_op").unwrap_or(0) > 0);
    }
}
