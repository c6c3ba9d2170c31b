//! virtio-vsock end to end: the test guest and host programs on Unix
//! sockets, in both directions, as Firecracker's host side works.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn guest_and_host_programs_connect_both_ways_and_echo() {
    common::require_kvm();
    let dir = common::TempFile::new("unused", b"");
    let uds = dir.path.with_file_name("v.sock");
    // The host service the guest connects to: echo everything.
    let listener = UnixListener::bind(format!("{}_52", uds.display())).expect("bind port 52");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("the guest connects");
        let mut buf = vec![0u8; 6000];
        s.read_exact(&mut buf).expect("the guest's message");
        s.write_all(&buf).expect("echo");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the guest closes");
        (buf, rest.len())
    });
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut cmd = Command::new(common::minimal_bin());
    cmd.args([
        "--vsock",
        &vsock,
        "--cmdline",
        "console=ttyS0 testguest.run=vsock,exit",
    ]);
    let (child, rx) = common::spawn_lines(cmd);
    let mut seen = Vec::new();
    common::wait_line(&rx, "vsock listen port=1234 ready", &mut seen);
    // A host program connects to the guest's port 1234.
    let mut s = UnixStream::connect(&uds).expect("connect to the VMM's socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("test step");
    s.write_all(b"CONNECT 1234\n").expect("test step");
    let mut ok = Vec::new();
    let mut byte = [0u8; 1];
    while !ok.ends_with(b"\n") {
        s.read_exact(&mut byte).expect("the OK line");
        ok.push(byte[0]);
    }
    let ok = String::from_utf8(ok).expect("test step");
    assert!(
        ok.starts_with("OK ") && ok[3..].trim().parse::<u32>().is_ok(),
        "{ok:?}"
    );
    let msg = pattern(10_000, 9);
    s.write_all(&msg).expect("test step");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("the guest's echo");
    assert_eq!(back, msg);
    s.shutdown(std::net::Shutdown::Write).expect("test step");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the connection ends");
    let (code, err) = common::finish(child, &rx, &mut seen);
    let out = seen.join("\n");
    assert_eq!(code, 0, "{out}\n{err}");
    let (got, extra) = echo.join().expect("test step");
    let sent: Vec<u8> = (0..6000u64)
        .map(|i| ((i % 4096) as u8).wrapping_mul(13).wrapping_add(5))
        .collect();
    assert_eq!(got, sent, "the guest's message arrived whole");
    assert_eq!(extra, 0);
    assert!(out.contains("vsock cid=3"), "{out}");
    assert!(
        out.contains("vsock connect port=52 echo=ok bytes=6000"),
        "{out}"
    );
    assert!(
        out.contains("vsock accept ok port=1234 bytes=10000"),
        "{out}"
    );
    assert!(!uds.exists(), "the VMM removes its socket");
}

/// A host program's request that the guest never answers (here its driver
/// never starts) ends after the device's timeout: the program's socket
/// closes without an `OK`, and the VMM runs on.
#[test]
fn a_host_request_nobody_answers_ends_after_the_timeout() {
    common::require_kvm();
    let dir = common::TempFile::new("unused", b"");
    let uds = dir.path.with_file_name("v.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut cmd = Command::new(common::minimal_bin());
    cmd.args([
        "--vsock",
        &vsock,
        "--cmdline",
        "console=ttyS0 testguest.run=spin",
    ]);
    let (mut child, rx) = common::spawn_lines(cmd);
    common::wait_line(&rx, "testguest: spin", &mut Vec::new());
    let mut s = UnixStream::connect(&uds).expect("connect to the VMM's socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("test step");
    let asked = Instant::now();
    s.write_all(b"CONNECT 52\n").expect("test step");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the socket closes");
    let waited = asked.elapsed();
    let alive = child.try_wait().expect("test step").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let timeout = vmm_kit::devices::virtio::vsock::CONN_REQUEST_TIMEOUT;
    assert!(
        waited >= timeout - Duration::from_millis(50) && waited < timeout * 3,
        "closed after {waited:?}"
    );
    assert!(alive, "the VMM died on the timer");
}

#[test]
fn bad_vsock_settings_are_refused_clearly() {
    let dir = common::TempFile::new("taken.sock", b"");
    for (spec, needle) in [
        ("cid=2,uds=/tmp/x".to_string(), "bad vsock cid"),
        ("cid=3".to_string(), "needs uds=PATH"),
        ("uds=/tmp/x".to_string(), "needs cid=N"),
        (
            "cid=3,uds=/tmp/x,port=1".to_string(),
            "unknown vsock option",
        ),
        ("cid=3,uds=/tmp/x,cid=4".to_string(), "\"cid\" given twice"),
        (
            format!("cid=3,uds={}", dir.arg()),
            "is a regular file, not a socket",
        ),
    ] {
        let o = common::run_minimal(&["--vsock", &spec]);
        common::assert_clean_failure(&o, needle);
    }
}

#[test]
fn the_api_takes_a_vsock_device() {
    use common::api::{call, fault, Vmm};
    let mut vmm = Vmm::start(&[]);
    let sock = vmm.sock.clone();
    let uds = vmm.file("guest.vsock");
    let put = |body| call(&sock, "PUT", "/vsock", Some(body));
    let (code, resp) = put(json!({"guest_cid": 1, "uds_path": uds}));
    assert_eq!(code, 400);
    assert!(fault(&resp).contains("Invalid guest CID"), "{resp}");
    let taken = vmm.kernel();
    let (code, resp) = put(json!({"guest_cid": 3, "uds_path": taken}));
    assert_eq!(code, 400);
    assert!(
        fault(&resp).contains("is a regular file, not a socket"),
        "{resp}"
    );
    // A live socket (the API's own) is refused; a stale one is replaced.
    let (code, resp) = put(json!({"guest_cid": 3, "uds_path": sock}));
    assert_eq!(code, 400);
    assert!(fault(&resp).contains("is in use"), "{resp}");
    drop(UnixListener::bind(&uds).expect("a socket nobody serves"));
    let (code, resp) = put(json!({"guest_cid": 3, "uds_path": uds, "vsock_id": "v"}));
    assert_eq!(code, 204, "{resp}");
    let (code, resp) = call(
        &sock,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": vmm.kernel(),
                    "boot_args": "console=ttyS0 testguest.run=spin"})),
    );
    assert_eq!(code, 204, "{resp}");
    let (code, resp) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(code, 204, "{resp}");
    vmm.wait_serial("spin");
    UnixStream::connect(&uds).expect("the device listens where the stale socket was");
    let (code, resp) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&resp).expect("test step");
    assert_eq!(config["vsock"]["guest_cid"], 3);
    let (code, _) = call(
        &sock,
        "PUT",
        "/vsock",
        Some(json!({"guest_cid": 4, "uds_path": uds})),
    );
    assert_eq!(code, 400, "not after the start");
    let (code, _) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStop"})),
    );
    assert_eq!(code, 204);
    vmm.wait();
}
