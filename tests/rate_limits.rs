//! Disk rate limits end to end: the guest's benchmark against a limited
//! disk takes as long as the limit says.

mod common;

use std::time::Instant;

/// 1252 requests against 1000 requests/s (100 every 100 ms, the first 100
/// at once) take 1.15 s; unlimited, a fraction of that.
#[test]
fn an_operations_limit_paces_the_guests_disk_requests() {
    common::require_kvm();
    let img = common::TempFile::new("disk.img", &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .expect("test step")
        .set_len(16 << 20)
        .expect("test step");
    let disk = format!("{},ops=100/100", img.arg());
    let start = Instant::now();
    let o = common::run_minimal(&[
        "--disk",
        &disk,
        "--cmdline",
        "console=ttyS0 testguest.run=bench-blk,exit testguest.bench_iters=200",
    ]);
    let elapsed = start.elapsed().as_secs_f64();
    let out = common::stdout(&o);
    assert!(o.status.success(), "{out}\n{}", common::stderr(&o));
    // Every load's timed requests and its warm-up round.
    let requests: u64 = out
        .lines()
        .filter_map(vmm_kit::testguest::parse_line)
        .filter(|r| r.event == "bench-blk")
        .filter_map(|r| Some(r.get_u64("requests")? + r.get_u64("depth")?))
        .sum();
    assert_eq!(requests, 1252, "{out}");
    let expected = (requests - 100) as f64 / 1000.0;
    assert!(
        elapsed >= expected * 0.98 && elapsed < expected + 0.3,
        "{requests} requests took {elapsed:.3} s, the limit says {expected:.3} s"
    );
}

/// Bad limits are refused with a clear message.
#[test]
fn bad_disk_limits_are_refused() {
    for (spec, needle) in [
        ("bandwidth=1M", "SIZE/MS"),
        ("ops=0/100", "not a usable size"),
        ("ops=10/0", "must not be 0"),
        ("iops=10/10", "unknown disk option"),
    ] {
        let o = common::run_minimal(&["--disk", &format!("/dev/null,{spec}")]);
        common::assert_clean_failure(&o, needle);
    }
}

/// A disk limited to 10 requests a second holds the guest's benchmark back
/// until `PATCH /drives` lifts the limit (a bucket of size 0), while its
/// requests wait on the limiter's timer: the guest then finishes at once.
#[test]
fn patching_a_running_disks_limit_over_the_api_takes_effect_at_once() {
    use common::api::{call, Vmm};
    use serde_json::json;

    let mut vmm = Vmm::start(&[]);
    let img = vmm.file("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).expect("test step");
    let sock = vmm.sock.clone();
    let put = |path: &str, body: serde_json::Value| {
        let (code, resp) = call(&sock, "PUT", path, Some(body));
        assert_eq!(code, 204, "PUT {path}: {resp}");
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": vmm.kernel(),
               "boot_args": "console=ttyS0 testguest.run=hello,bench-blk,exit testguest.bench_iters=200"}),
    );
    put(
        "/drives/d0",
        json!({"drive_id": "d0", "path_on_host": img, "is_root_device": false,
               "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}),
    );
    put("/actions", json!({"action_type": "InstanceStart"}));
    vmm.wait_serial("hello");
    // Let the guest run into the limit.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let start = Instant::now();
    let (code, resp) = call(
        &sock,
        "PATCH",
        "/drives/d0",
        Some(json!({"drive_id": "d0", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})),
    );
    assert_eq!(code, 204, "{resp}");
    let (status, err) = vmm.wait();
    let serial = std::fs::read_to_string(&vmm.serial).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{serial}\n{err}");
    assert!(
        start.elapsed().as_secs() < 20,
        "the guest finished {:?} after the limit was lifted (at 10 requests/s it takes two minutes)",
        start.elapsed()
    );
}
