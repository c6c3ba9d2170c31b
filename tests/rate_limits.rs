//! Rate limits end to end: a guest's disk requests and network frames take
//! as long as their limits say. The tests here time what they measure, so
//! they run one at a time (each holds [`alone`]): a second guest booting on
//! a 2-CPU host delays the event loop and the guest alike.

mod common;

use std::net::UdpSocket;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::netns::{spawn_in, NetNs, GUEST_MAC, HOST_IP};
use common::{finish, wait_line};

/// Held by each test for its whole run, so that no two run at once.
fn alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed poisons the lock; the next still runs alone.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 1252 requests against 1000 requests/s (100 every 100 ms, the first 100
/// at once) take 1.15 s; unlimited, a fraction of that. Timed between the
/// guest's lines (its boot, its benchmark's end) so that starting and
/// stopping the process on a busy host does not count.
#[test]
fn an_operations_limit_paces_the_guests_disk_requests() {
    let _alone = alone();
    common::require_kvm();
    let img = common::TempFile::new("disk.img", &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .expect("test step")
        .set_len(16 << 20)
        .expect("test step");
    let disk = format!("{},ops=100/100", img.arg());
    let (o, lines) = common::run_minimal_timed(&[
        "--disk",
        &disk,
        "--cmdline",
        "console=ttyS0 testguest.run=bench-blk,exit testguest.bench_iters=200",
    ]);
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
    let at = |prefix: &str| {
        lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| t.as_secs_f64())
            .unwrap_or_else(|| panic!("no line {prefix:?}: {out}"))
    };
    let elapsed = at("testguest: bench-blk ok") - at("testguest: boot ");
    let expected = (requests - 100) as f64 / 1000.0;
    assert!(
        elapsed >= expected * 0.98 && elapsed < expected * 1.1 + 0.1,
        "{requests} requests took {elapsed:.3} s, the limit says {expected:.3} s"
    );
}

/// Bad limits are refused with a clear message.
#[test]
fn bad_disk_limits_are_refused() {
    let _alone = alone();
    for (spec, needle) in [
        ("bandwidth=1M", "SIZE/MS"),
        ("ops=0/100", "not a usable size"),
        ("ops=10/0", "must not be 0"),
        ("iops=10/10", "unknown disk option"),
        ("ops=10/10,ops=20/10", "\"ops\" given twice"),
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
    let _alone = alone();
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

/// The transmit limiter holds the guest to its rate: 1514-byte frames sent
/// as fast as the guest can through a 2 MB/s bucket arrive at 2 MB/s,
/// within 5 %.
#[test]
fn a_transmit_rate_limit_holds_the_guest_to_its_rate() {
    let _alone = alone();
    let ns = NetNs::with_tap("txlimit", "tap0", HOST_IP);
    let frames = 2000u64;
    let size = 1514u64;
    let iters = format!(
        "console=ttyS0 testguest.run=net-bench,exit testguest.bench_iters={frames} testguest.net_size={size}"
    );
    // 20,000 bytes every 10 ms (room for the scheduling delays of a busy
    // test host; the bench measures 1 ms refills on an idle one).
    let net = format!("tap=tap0,mac={GUEST_MAC},tx-bandwidth=20000/10");
    let counted = ns.run(|| {
        let s = UdpSocket::bind((HOST_IP, 5001)).expect("bind 5001");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("test step");
        let (child, rx) = spawn_in(&ns, &["--net", &net, "--cmdline", &iters]);
        let mut times = Vec::new();
        let mut buf = [0u8; 2048];
        while (times.len() as u64) < frames {
            match s.recv(&mut buf) {
                Ok(_) => times.push(Instant::now()),
                Err(_) => break,
            }
        }
        // The guest goes on to pings and a receive phase nobody feeds.
        let mut child = child;
        let _ = child.kill();
        let mut seen = Vec::new();
        let _ = finish(child, &rx, &mut seen);
        (times, seen)
    });
    let (times, seen) = counted;
    assert!(
        times.len() as u64 >= frames * 95 / 100,
        "{} of {frames} frames arrived; guest said:\n{}",
        times.len(),
        seen.join("\n")
    );
    // The rate over the second half (the bucket's first fill long spent).
    let half = times.len() / 2;
    let elapsed = times[times.len() - 1] - times[half];
    let bytes = ((times.len() - 1 - half) as u64 * size) as f64;
    let rate = bytes / elapsed.as_secs_f64();
    let expected = 2_000_000.0;
    assert!(
        (rate - expected).abs() / expected < 0.05,
        "measured {rate:.0} B/s, limit {expected} B/s"
    );
}

/// The host's TSC rate (the guest reports TSC cycles; on KVM the guest's
/// TSC runs at the host's).
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no side effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let c0 = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / c0.elapsed().as_secs_f64()
}

/// The receive limiter holds what the guest gets to its rate: frames the
/// host floods at the guest arrive at 5 MB/s (a 50 KB bucket refilled every
/// 10 ms), within 10 %, however fast they were sent. (The bench measures
/// 1 ms refills on an idle host.)
#[test]
fn a_receive_rate_limit_paces_what_the_guest_gets() {
    let _alone = alone();
    use vmm_kit::devices::test_utils::{udp_frame, HostLink};

    let ns = NetNs::with_tap("rxlimit", "tap0", HOST_IP);
    let net = format!("tap=tap0,mac={GUEST_MAC},rx-bandwidth=50000/10");
    let (child, rx) = spawn_in(
        &ns,
        &[
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 testguest.run=net-bench,exit testguest.bench_iters=3000",
        ],
    );
    let mut seen = Vec::new();
    wait_line(&rx, "net-bench rx-ready", &mut seen);
    // UDP frames to the guest's port 5001, from a packet socket on the TAP.
    ns.run(|| {
        let f = udp_frame(
            [0x06, 0, 0xac, 0x10, 0, 0x02],
            [172, 16, 0, 1],
            [172, 16, 0, 2],
            5001,
            1514,
        );
        let link = HostLink::bind("tap0").expect("a packet socket on the TAP");
        for _ in 0..3000 {
            let _ = link.send(&f);
        }
    });
    let (code, err) = finish(child, &rx, &mut seen);
    let out = seen.join("\n");
    assert_eq!(code, 0, "{out}\n{err}");
    let r = vmm_kit::testguest::parse_output(&out)
        .into_iter()
        .find(|r| r.event == "net-bench" && r.words.first().map(String::as_str) == Some("rx"))
        .expect("the guest's receive report");
    let frames = r.get_u64("frames").expect("frames");
    let secs = r.get_u64("cycles").expect("cycles") as f64 / tsc_hz();
    assert!(frames > 100, "only {frames} frames came: {out}");
    // Between the first and the last frame: frames - 1 intervals.
    let rate = (frames - 1) as f64 * 1514.0 / secs;
    assert!(
        (rate - 5_000_000.0).abs() / 5_000_000.0 < 0.10,
        "the guest got {rate:.0} B/s ({frames} frames in {secs:.3} s), limit 5 MB/s"
    );
}
