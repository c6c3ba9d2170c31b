//! The management API from the outside, as an orchestrator drives it: the
//! reference VMM with `--api-sock`, a plain HTTP/1.1 client on the Unix
//! socket, Firecracker's paths, bodies, status codes and `fault_message`
//! errors; the same description from `--config-file`; hostile clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api::{call, fault, parse_response, state, Vmm};
use common::{minimal_bin, require_kvm, TempFile};
use serde_json::{json, Value};

#[test]
fn a_whole_lifecycle_over_the_socket() {
    let mut vmm = Vmm::start(&[]);
    let sock = vmm.sock.clone();
    let disk = vmm.file("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("test step");
    let metrics = vmm.file("metrics.json");

    assert_eq!(state(&sock), "Not started");
    let (code, body) = call(&sock, "GET", "/version", None);
    assert_eq!(code, 200);
    assert!(body.contains("firecracker_version"), "{body}");

    // Post-boot calls are refused before the start, as Firecracker refuses
    // them.
    let (code, body) = call(&sock, "PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(code, 400);
    assert_eq!(
        fault(&body),
        "The requested operation is not supported before starting the microVM."
    );
    let patch = json!({"drive_id": "rootfs", "path_on_host": "/tmp/x"});
    let (code, body) = call(&sock, "PATCH", "/drives/rootfs", Some(patch));
    assert_eq!(code, 400);
    assert_eq!(
        fault(&body),
        "The requested operation is not supported before starting the microVM."
    );
    let (code, body) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(code, 400, "no kernel yet");
    assert!(fault(&body).contains("boot-source"), "{body}");

    let machine = json!({"vcpu_count": 2, "mem_size_mib": 256});
    assert_eq!(call(&sock, "PUT", "/machine-config", Some(machine)).0, 204);
    assert_eq!(
        call(
            &sock,
            "PATCH",
            "/machine-config",
            Some(json!({"mem_size_mib": 192}))
        )
        .0,
        204
    );
    let (code, body) = call(&sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    let m: Value = serde_json::from_str(&body).expect("test step");
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
    let boot = json!({
        "kernel_image_path": vmm.kernel(),
        "boot_args": "console=ttyS0 testguest.run=hello,blk,spin",
    });
    assert_eq!(call(&sock, "PUT", "/boot-source", Some(boot)).0, 204);
    let drive = json!({
        "drive_id": "rootfs",
        "path_on_host": disk,
        "is_root_device": true,
        "is_read_only": false,
    });
    assert_eq!(call(&sock, "PUT", "/drives/rootfs", Some(drive)).0, 204);
    // A second drive, read-only, whose id is longer than a virtio-blk id.
    let scratch = vmm.file("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).expect("test step");
    let long = "scratch_drive_with_a_long_name";
    let drive = json!({
        "drive_id": long,
        "path_on_host": scratch,
        "is_root_device": false,
        "is_read_only": true,
    });
    let (code, body) = call(&sock, "PUT", &format!("/drives/{long}"), Some(drive));
    assert_eq!(code, 204, "{body}");
    assert_eq!(call(&sock, "PUT", "/entropy", Some(json!({}))).0, 204);
    let m = json!({"metrics_path": metrics});
    assert_eq!(call(&sock, "PUT", "/metrics", Some(m.clone())).0, 204);
    let (code, body) = call(&sock, "PUT", "/metrics", Some(m));
    assert_eq!(code, 400, "metrics are set once");
    assert!(fault(&body).contains("Reinitialization"), "{body}");

    let (code, body) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(code, 204, "{body}");
    vmm.wait_serial("testguest: spin");
    assert_eq!(state(&sock), "Running");
    let serial = std::fs::read_to_string(&vmm.serial).expect("test step");
    assert!(
        serial.contains("mem_mib=192"),
        "the guest got the configured RAM: {serial}"
    );
    assert!(
        serial.contains("rootfs"),
        "the guest read the drive's id: {serial}"
    );
    assert!(
        serial.contains("ro=1 capacity=2048 id=scratch_drive_with_a "),
        "the guest reads the first 20 bytes of a long drive id: {serial}"
    );

    // Pre-boot calls are refused after the start.
    for (method, path, body) in [
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": vmm.kernel()}),
        ),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        ("PUT", "/logger", json!({"log_path": metrics})),
    ] {
        let (code, resp) = call(&sock, method, path, Some(body));
        assert_eq!(code, 400, "{method} {path}");
        assert_eq!(
            fault(&resp),
            "The requested operation is not supported after starting the microVM."
        );
    }

    assert_eq!(
        call(&sock, "PATCH", "/vm", Some(json!({"state": "Paused"}))).0,
        204
    );
    assert_eq!(state(&sock), "Paused");
    assert_eq!(
        call(&sock, "PATCH", "/vm", Some(json!({"state": "Resumed"}))).0,
        204
    );
    assert_eq!(state(&sock), "Running");

    let (code, body) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    let cfg: Value = serde_json::from_str(&body).expect("test step");
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert!(cfg["boot-source"]["kernel_image_path"].is_string());

    // The drive moves to another image while the guest runs.
    let other = vmm.file("other.img");
    std::fs::write(&other, vec![0u8; 2 << 20]).expect("test step");
    let patch = |id: &str, path: &Path| {
        call(
            &sock,
            "PATCH",
            &format!("/drives/{id}"),
            Some(json!({"drive_id": id, "path_on_host": path})),
        )
    };
    let (code, body) = patch("rootfs", &other);
    assert_eq!(code, 204, "{body}");
    let (code, body) = patch("rootfs", &vmm.file("missing.img"));
    assert_eq!(code, 400);
    assert!(fault(&body).contains("missing.img"), "{body}");
    let (code, body) = patch("nodisk", &other);
    assert_eq!(code, 400);
    assert!(fault(&body).contains("nodisk"), "{body}");
    let (_, body) = call(&sock, "GET", "/vm/config", None);
    assert!(body.contains("other.img"), "{body}");

    let (code, _) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
    );
    assert_eq!(code, 204);
    let lines = std::fs::read_to_string(&metrics).expect("test step");
    let last: Value =
        serde_json::from_str(lines.lines().last().expect("test step")).expect("test step");
    assert!(last["utc_timestamp_ms"].as_u64().expect("test step") > 0);
    assert!(
        last["put_api_requests"]["actions_count"]
            .as_u64()
            .expect("test step")
            >= 1
    );
    assert!(last["put_api_requests"]["metrics_fails"].as_u64() == Some(1));
    assert!(
        last["block_rootfs"].is_object(),
        "per-drive counters: {last}"
    );
    assert!(
        last["uart"]["write_count"].as_u64().expect("test step") > 0,
        "{last}"
    );
    assert!(
        last["vcpu"]["exit_io_out"].as_u64().expect("test step") > 0,
        "{last}"
    );

    let (code, _) = call(
        &sock,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStop"})),
    );
    assert_eq!(code, 204);
    let (status, err) = vmm.wait();
    assert_eq!(status.code(), Some(7), "stopped on request: {err}");
    assert!(!sock.exists(), "the socket is removed at the end");
    // A last line at the end, with what happened since FlushMetrics.
    let lines = std::fs::read_to_string(&metrics).expect("test step");
    let last: Value =
        serde_json::from_str(lines.lines().last().expect("a line")).expect("test step");
    // FlushMetrics is counted once done, so in this line, with InstanceStop.
    assert_eq!(last["put_api_requests"]["actions_count"], 2, "{last}");
    assert!(last["block_rootfs"].is_object(), "{last}");
}

#[test]
fn send_ctrl_alt_del_reboots_the_guest_which_ends_the_vmm() {
    let mut vmm = Vmm::start(&[]);
    let sock = vmm.sock.clone();
    let action = json!({"action_type": "SendCtrlAltDel"});
    let (code, body) = call(&sock, "PUT", "/actions", Some(action.clone()));
    assert_eq!(code, 400);
    assert_eq!(
        fault(&body),
        "The requested operation is not supported before starting the microVM."
    );
    let boot = json!({
        "kernel_image_path": vmm.kernel(),
        "boot_args": "console=ttyS0 testguest.run=kbd",
    });
    assert_eq!(call(&sock, "PUT", "/boot-source", Some(boot)).0, 204);
    let start = json!({"action_type": "InstanceStart"});
    assert_eq!(call(&sock, "PUT", "/actions", Some(start)).0, 204);
    vmm.wait_serial("testguest: kbd ready");
    assert_eq!(call(&sock, "PUT", "/actions", Some(action)).0, 204);
    vmm.wait_serial("testguest: kbd ctrl-alt-del");
    let (status, err) = vmm.wait();
    assert_eq!(
        status.code(),
        Some(0),
        "the guest's reset ends the VMM: {err}"
    );
}

#[test]
fn api_drives_join_the_disks_of_the_flags_the_root_device_first() {
    let cli = TempFile::new("cli.img", &vec![0u8; 1 << 20]);
    let cli_disk = format!("{},id=cli", cli.arg());
    let mut vmm = Vmm::start(&["--disk", &cli_disk]);
    let sock = vmm.sock.clone();
    let root = vmm.file("root.img");
    std::fs::write(&root, vec![0u8; 2 << 20]).expect("test step");
    let boot = json!({
        "kernel_image_path": vmm.kernel(),
        "boot_args": "console=ttyS0 testguest.run=blk,exit",
    });
    assert_eq!(call(&sock, "PUT", "/boot-source", Some(boot)).0, 204);
    let drive = json!({"drive_id": "rootfs", "path_on_host": root, "is_root_device": true});
    assert_eq!(call(&sock, "PUT", "/drives/rootfs", Some(drive)).0, 204);
    let start = json!({"action_type": "InstanceStart"});
    assert_eq!(call(&sock, "PUT", "/actions", Some(start)).0, 204);
    let (status, err) = vmm.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    let serial = std::fs::read_to_string(&vmm.serial).expect("test step");
    assert!(
        serial.contains("dev=0 ro=0 capacity=4096 id=rootfs"),
        "{serial}"
    );
    assert!(
        serial.contains("dev=1 ro=0 capacity=2048 id=cli"),
        "{serial}"
    );
}

#[test]
fn a_signal_stops_an_api_started_vm_in_order() {
    let mut vmm = Vmm::start(&[]);
    let boot = json!({
        "kernel_image_path": vmm.kernel(),
        "boot_args": "console=ttyS0 testguest.run=spin",
    });
    assert_eq!(call(&vmm.sock, "PUT", "/boot-source", Some(boot)).0, 204);
    let start = json!({"action_type": "InstanceStart"});
    assert_eq!(call(&vmm.sock, "PUT", "/actions", Some(start)).0, 204);
    vmm.wait_serial("testguest: spin");
    // SAFETY: sending SIGTERM to the child this test started.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let (status, err) = vmm.wait();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{err}");
}

#[test]
fn a_signal_before_the_start_removes_the_socket() {
    let mut vmm = Vmm::start(&[]);
    assert_eq!(state(&vmm.sock), "Not started");
    // SAFETY: sending SIGTERM to the child this test started.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let (status, err) = vmm.wait();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{err}");
    assert!(!vmm.sock.exists(), "the socket is removed");
}

#[test]
fn bad_requests_get_400_with_a_message_and_the_vmm_lives_on() {
    let vmm = Vmm::start(&[]);
    let sock = &vmm.sock;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "GET",
            "/nowhere",
            Value::Null,
            "Invalid request method and/or path",
        ),
        (
            "DELETE",
            "/machine-config",
            Value::Null,
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 0, "mem_size_mib": 128}),
            "vcpus",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 255, "mem_size_mib": 128}),
            "vcpus",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 128}),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 0}),
            "MiB",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128, "gpus": 1}),
            "unknown field `gpus`",
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 128, "smt": true}),
            "smt",
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "/no/such/kernel"}),
            "/no/such/kernel",
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": "/dev"}),
            "not a regular file",
        ),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "b", "is_root_device": false}),
            "does not match",
        ),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "a", "is_root_device": false, "path_on_host": "/nope"}),
            "/nope",
        ),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "a", "is_root_device": false, "path_on_host": "/dev/null",
                   "io_engine": "Async"}),
            "not supported",
        ),
        (
            "PUT",
            "/actions",
            json!({"action_type": "Reboot"}),
            "unknown variant",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            json!({}),
            "missing field",
        ),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "a", "is_root_device": false, "path_on_host": "/dev/null",
                   "rate_limiter": {"bandwidth": {"size": "lots", "refill_time": 100}}}),
            "invalid type",
        ),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "a", "is_root_device": false, "path_on_host": "/dev/null",
                   "rate_limiter": {"ops": {"size": 1, "refill_time": 1, "burst": 3}}}),
            "unknown field `burst`",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0",
                   "tx_rate_limiter": {"bandwidth": {"size": -1, "refill_time": 100}}}),
            "invalid value",
        ),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": "3", "uds_path": "/tmp/v.sock"}),
            "invalid type",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}),
            "multicast",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "a-name-far-too-long-for-a-tap"}),
            "bad TAP interface name",
        ),
        (
            "PUT",
            "/logger",
            json!({"log_path": "/tmp/x", "level": "Loud"}),
            "unknown log level",
        ),
    ];
    for (method, path, body, want) in cases {
        let body = (!body.is_null()).then_some(body);
        let (code, resp) = call(sock, method, path, body);
        assert_eq!(code, 400, "{method} {path}: {resp}");
        assert!(fault(&resp).contains(want), "{method} {path}: {resp}");
    }
    // Raw garbage, an oversized body, chunked bodies.
    for (raw, want) in [
        (b"\x16\x03\x01 not http\r\n\r\n".to_vec(), 400),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            501,
        ),
        (
            format!("GET /{} HTTP/1.1\r\n", "x".repeat(9000)).into_bytes(),
            431,
        ),
    ] {
        let mut s = UnixStream::connect(sock).expect("test step");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("test step");
        s.write_all(&raw).expect("test step");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert_eq!(parse_response(&resp).0, want, "{resp}");
    }
    // Nothing changed, and the VMM still answers.
    let (code, body) = call(sock, "GET", "/machine-config", None);
    assert_eq!(code, 200);
    assert!(body.contains("\"vcpu_count\":1"), "{body}");
}

#[test]
fn a_stalled_or_greedy_client_does_not_stall_the_others() {
    let vmm = Vmm::start(&[]);
    let sock = &vmm.sock;
    // Half a request, never finished.
    let mut stalled = UnixStream::connect(sock).expect("test step");
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .expect("test step");
    let since = Instant::now();
    let t = Instant::now();
    assert_eq!(call(sock, "GET", "/", None).0, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered while one stalls"
    );
    // The half request is dropped after its timeout (5 s), unanswered.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("test step");
    let mut buf = Vec::new();
    let _ = stalled.read_to_end(&mut buf);
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "dropped after {waited:?}"
    );
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    // More idle connections than the server keeps: the oldest give way.
    let mut idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(sock).expect("test step"))
        .collect();
    let t = Instant::now();
    assert_eq!(call(sock, "GET", "/", None).0, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "answered past the connection limit"
    );
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("test step");
    assert_eq!(
        idle[0].read(&mut [0u8; 8]).unwrap_or(0),
        0,
        "the oldest idle one was closed"
    );
    drop(idle);
    // Keep-alive: two requests on one connection, answered in order.
    let mut s = UnixStream::connect(sock).expect("test step");
    s.write_all(b"GET /version HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("test step");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("test step");
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    assert!(resp.find("firecracker_version") < resp.find("app_name"));
}

#[test]
fn the_socket_path_is_not_taken_from_a_file_or_a_live_vmm() {
    let f = TempFile::new("not-a-socket", b"precious");
    let out = Command::new(minimal_bin())
        .args(["--api-sock", f.arg()])
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&f.path).expect("test step"), b"precious");

    let first = Vmm::start(&[]);
    let out = Command::new(minimal_bin())
        .arg("--api-sock")
        .arg(&first.sock)
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert_eq!(
        state(&first.sock),
        "Not started",
        "the first VMM still serves"
    );
}

#[test]
fn a_config_file_boots_without_a_socket() {
    require_kvm();
    let kernel = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let dir = kernel.path.parent().expect("test step");
    let log = dir.join("vmm.log");
    let config = json!({
        "boot-source": {
            "kernel_image_path": kernel.arg(),
            "boot_args": "console=ttyS0 testguest.run=hello,exit testguest.exit=21",
        },
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 160},
        "drives": [],
        "entropy": {},
        "logger": {"log_path": log, "level": "Info", "show_level": true},
    });
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, config.to_string()).expect("test step");
    let out = Command::new(minimal_bin())
        .arg("--config-file")
        .arg(&cfg)
        .arg("--no-api")
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mem_mib=160"), "{text}");
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logged = std::fs::read_to_string(&log).expect("test step");
    let line = logged
        .lines()
        .find(|l| l.contains("guest ended"))
        .unwrap_or_else(|| panic!("the log went to the file: {logged}"));
    // Firecracker's layout: time, [instance:thread:level] message.
    assert!(
        line.contains(" [anonymous-instance:main:INFO] guest ended"),
        "{line}"
    );
    assert!(
        line.starts_with("20") && line.as_bytes()[10] == b'T',
        "{line}"
    );

    // A file that is not the shape: refused, naming the file and the field.
    std::fs::write(
        &cfg,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "gpu": {}}"#,
    )
    .expect("test step");
    let out = Command::new(minimal_bin())
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vm.json") && err.contains("unknown field `gpu`"),
        "{err}"
    );

    // One the API refuses (a section not offered yet): no socket left behind.
    std::fs::write(
        &cfg,
        r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false}}"#,
    )
    .expect("cfg");
    let sock = dir.join("api.sock");
    let out = Command::new(minimal_bin())
        .arg("--config-file")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("balloon is not supported"), "{err}");
    assert!(!sock.exists(), "the socket is removed");

    let out = Command::new(minimal_bin())
        .args(["--no-api", "--api-sock", "/tmp/x.sock"])
        .stdin(Stdio::null())
        .output()
        .expect("test step");
    assert_eq!(
        out.status.code(),
        Some(3),
        "--no-api and --api-sock conflict"
    );
}
