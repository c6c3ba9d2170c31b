//! virtio-net end to end: the test guest on a TAP in a network namespace
//! each test makes (and removes), talking to the host's own network stack.

mod common;

use std::net::UdpSocket;
use std::process::Stdio;
use std::time::Duration;

use common::netns::{spawn_in, NetNs, GUEST_IP, GUEST_MAC, HOST_IP};
use common::{finish, wait_line};
use vmm_kit::core::{HostIo, KernelSource, NetConfig, VmConfig, VmExit, Vmm};

#[test]
fn the_guest_and_the_host_stack_talk_both_ways() {
    let ns = NetNs::with_tap("both", "tap0", HOST_IP);
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let (child, rx) = spawn_in(
        &ns,
        &[
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 testguest.run=net,exit testguest.net_serve=3",
        ],
    );
    let mut seen = Vec::new();
    wait_line(&rx, "net serve ready", &mut seen);
    // The host resolves the guest by ARP, then UDP echo to port 7.
    ns.run(|| {
        let s = UdpSocket::bind((HOST_IP, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("test step");
        for i in 0..3u8 {
            let msg: Vec<u8> = (0..200u16).map(|b| (b as u8).wrapping_add(i)).collect();
            s.send_to(&msg, (GUEST_IP, 7)).expect("send");
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf).expect("the guest's echo");
            assert_eq!(from.ip().to_string(), GUEST_IP);
            assert_eq!(&buf[..n], &msg[..], "echo {i} comes back whole");
        }
    });
    let (code, err) = finish(child, &rx, &mut seen);
    let out = seen.join("\n");
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("net mac={GUEST_MAC} ip={GUEST_IP} link=up")),
        "{out}"
    );
    assert!(out.contains(&format!("net arp peer={HOST_IP}")), "{out}");
    for seq in 1..=4 {
        assert!(out.contains(&format!("net ping seq={seq} ok")), "{out}");
    }
    assert!(out.contains("net ok pings=4 served=3"), "{out}");
}

#[test]
fn link_down_and_up_reach_the_guest_and_frames_flow_again() {
    common::require_kvm();
    let ns = NetNs::with_tap("link", "tap0", HOST_IP);
    ns.run(|| {
        let serial = common::SharedBuf::default();
        let mut nic = NetConfig::new("eth0", "tap0");
        nic.mac = Some(GUEST_MAC.parse().expect("test step"));
        let config = VmConfig {
            kernel: KernelSource::Bytes(vmm_kit::testguest::IMAGE),
            cmdline: "console=ttyS0 testguest.run=net-link,exit".into(),
            nets: vec![nic],
            ..VmConfig::default()
        };
        let vmm = Vmm::new(&config, HostIo::serial(Box::new(serial.clone()))).expect("build");
        let handle = vmm.handle();
        let running = vmm.start().expect("start");
        serial.wait_for("net-link state=up", Duration::from_secs(30));
        assert!(handle.set_net_link("nope", false).is_err(), "no such NIC");
        handle.set_net_link("eth0", false).expect("link down");
        serial.wait_for("net-link state=down", Duration::from_secs(30));
        handle.set_net_link("eth0", true).expect("link up");
        serial.wait_for("net-link state=up-again", Duration::from_secs(30));
        let exit = running.wait().expect("run");
        assert_eq!(exit, VmExit::GuestStatus(0), "{}", serial.text());
        assert!(serial.text().contains("net-link ok"), "{}", serial.text());
    });
}

#[test]
fn bad_nic_flags_and_a_busy_tap_are_refused_clearly() {
    common::require_kvm();
    for (flag, needle) in [
        ("mac=06:00:00:00:00:01", "a NIC needs tap=NAME or fd=N"),
        ("tap=tap0,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=tap0,mac=nonsense", "bad MAC address"),
        ("tap=tap0,speed=10", "unknown NIC option"),
        ("tap=tap0,tx-bandwidth=0/100", "not a usable size"),
        ("tap=tap0,tx-bandwidth=10/0", "must not be 0"),
        ("tap=tap0,rx-ops=100", "SIZE/MS"),
        ("tap=this-name-is-too-long", "bad TAP interface name"),
        ("tap=tap0,tx-ops=1/1,tx-ops=2/2", "\"tx-ops\" given twice"),
        ("tap=tap0,fd=3", "not both"),
        // Standard input (here /dev/null) is not a TAP; the message names
        // the descriptor given, not the VMM's duplicate of it.
        ("fd=0", "file descriptor 0 is not a TAP device"),
    ] {
        let o = common::run_minimal(&["--net", flag]);
        common::assert_clean_failure(&o, needle);
    }
    for args in [
        &[
            "--restore",
            "/nonexistent",
            "--restore-memory",
            "/m",
            "--restore-net",
            "eth0",
        ][..],
        &[
            "--restore",
            "/nonexistent",
            "--restore-memory",
            "/m",
            "--restore-net",
            "=tap0",
        ][..],
    ] {
        let o = common::run_minimal(args);
        common::assert_clean_failure(&o, "expected ID=TAP");
    }
    let o = common::run_minimal(&["--restore-net", "eth0=tap1"]);
    assert_eq!(o.status.code(), Some(3), "--restore-net needs --restore");
    let o = common::run_minimal(&["--restore-vsock", "/tmp/v.sock"]);
    assert_eq!(o.status.code(), Some(3), "--restore-vsock needs --restore");
    let o = common::run_minimal(&["--net", "fd=0"]);
    common::assert_clean_failure(&o, "not a TAP device");
    let o = common::run_minimal(&["--net", "tap=tap0,id=a", "--net", "tap=tap1,id=a"]);
    common::assert_clean_failure(&o, "two NICs have the id \"a\"");

    // A TAP another VMM is using.
    let ns = NetNs::with_tap("busy", "tap0", HOST_IP);
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let (mut first, rx) = spawn_in(
        &ns,
        &[
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 testguest.run=spin",
        ],
    );
    let mut seen = Vec::new();
    wait_line(&rx, "spin", &mut seen);
    let second = ns
        .command(&common::minimal_bin())
        .args(["--net", &net])
        .stdin(Stdio::null())
        .output()
        .expect("second VMM");
    first.kill().ok();
    first.wait().ok();
    common::assert_clean_failure(&second, "cannot attach to TAP interface tap0");
}

/// Firecracker's `network-interfaces`: PUT before boot (checked against
/// the TAP and the other interfaces), the guest's network up, PATCH of the
/// rate limiters while it runs, and the interface in the configuration.
#[test]
fn the_api_configures_interfaces_and_patches_their_limits() {
    use common::api::{call, fault, Vmm as ApiVmm};
    use serde_json::json;

    let ns = NetNs::with_tap("api", "tap0", HOST_IP);
    ns.add_tap("tap1", "172.16.1.1");
    let mut vmm = ApiVmm::start_in_netns(&ns.name, &[]);
    let sock = vmm.sock.clone();
    let put = |path: &str, body: serde_json::Value| call(&sock, "PUT", path, Some(body));
    let (code, resp) = put(
        "/boot-source",
        json!({"kernel_image_path": vmm.kernel(),
               "boot_args": "console=ttyS0 testguest.run=net,net-link,exit testguest.net_serve=0"}),
    );
    assert_eq!(code, 204, "{resp}");
    let eth0 = json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC,
                      "tx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}});
    let (code, resp) = put("/network-interfaces/eth0", eth0.clone());
    assert_eq!(code, 204, "{resp}");
    // Another interface on the same TAP, or with the same MAC, is refused.
    let (code, resp) = put(
        "/network-interfaces/eth1",
        json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
    );
    assert_eq!(code, 400);
    assert!(fault(&resp).contains("tap0 is already in use"), "{resp}");
    let (code, resp) = put(
        "/network-interfaces/eth1",
        json!({"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": GUEST_MAC}),
    );
    assert_eq!(code, 400);
    assert!(
        fault(&resp).contains("MAC address is already in use"),
        "{resp}"
    );
    // PATCH is for a running VM.
    let (code, _) = call(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0"})),
    );
    assert_eq!(code, 400);
    let (code, resp) = put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(code, 204, "{resp}");
    vmm.wait_serial("net ok pings=4");
    vmm.wait_serial("net-link state=up");
    let (code, resp) = call(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0",
                    "rx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}},
                    "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})),
    );
    assert_eq!(code, 204, "{resp}");
    let (code, resp) = call(
        &sock,
        "PATCH",
        "/network-interfaces/nope",
        Some(json!({"iface_id": "nope"})),
    );
    assert_eq!(code, 400);
    assert!(
        fault(&resp).contains("Invalid network interface ID"),
        "{resp}"
    );
    let (code, resp) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&resp).expect("test step");
    let nic = &config["network-interfaces"][0];
    assert_eq!(nic["host_dev_name"], "tap0");
    assert_eq!(nic["guest_mac"], GUEST_MAC);
    assert_eq!(nic["rx_rate_limiter"]["bandwidth"]["size"], 1000000);
    assert!(nic["tx_rate_limiter"].get("ops").is_none(), "{nic}");
    let (code, _) = put("/actions", json!({"action_type": "InstanceStop"}));
    assert_eq!(code, 204);
    vmm.wait();
}

/// UDP echo through the guest `n` times, from inside `ns`.
fn echo_through_guest(ns: &NetNs, n: u8) {
    ns.run(|| {
        let s = UdpSocket::bind((HOST_IP, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("test step");
        for i in 0..n {
            let msg = vec![i; 100];
            s.send_to(&msg, (GUEST_IP, 7)).expect("send");
            let mut buf = [0u8; 256];
            let (len, _) = s.recv_from(&mut buf).expect("the guest's echo");
            assert_eq!(&buf[..len], &msg[..]);
        }
    });
}

/// A paused guest with a NIC is saved over the API and loaded in another
/// process in another namespace, its NIC put on another TAP by
/// `network_overrides`: the guest, in the middle of answering echo
/// requests, answers the new host's.
#[test]
fn a_snapshot_keeps_the_nic_and_network_overrides_move_it() {
    use common::api::{call, Vmm as ApiVmm};
    use serde_json::json;

    let first_ns = NetNs::with_tap("snap", "tap0", HOST_IP);
    let second_ns = NetNs::with_tap("snap2", "tapc", HOST_IP);
    let dir = common::TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let base = dir.path.parent().expect("test step").to_path_buf();
    let kernel = dir.arg().to_string();
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let mut first = ApiVmm::start_in_ns(
        &base,
        "first",
        &[
            "--kernel",
            &kernel,
            "--net",
            &net,
            "--cmdline",
            "console=ttyS0 testguest.run=net,exit testguest.net_serve=4",
        ],
        &first_ns.name,
    );
    let put = |vmm: &ApiVmm, path: &str, body: serde_json::Value| {
        let (code, resp) = call(&vmm.sock, "PUT", path, Some(body));
        assert_eq!(code, 204, "PUT {path}: {resp}");
    };
    put(&first, "/actions", json!({"action_type": "InstanceStart"}));
    first.wait_serial("net serve ready");
    echo_through_guest(&first_ns, 2);
    let (code, resp) = call(
        &first.sock,
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
    );
    assert_eq!(code, 204, "{resp}");
    let (state, mem) = (base.join("vm.state"), base.join("vm.mem"));
    put(
        &first,
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    put(&first, "/actions", json!({"action_type": "InstanceStop"}));
    first.wait();

    let mut second = ApiVmm::start_in_ns(&base, "second", &[], &second_ns.name);
    // An override naming no interface of the snapshot is refused.
    let (code, _) = call(
        &second.sock,
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": state, "mem_file_path": mem,
                    "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tapc"}]})),
    );
    assert_eq!(code, 400);
    put(
        &second,
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_file_path": mem, "resume_vm": true,
               "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tapc"}]}),
    );
    echo_through_guest(&second_ns, 2);
    let (status, err) = second.wait();
    let serial = std::fs::read_to_string(&second.serial).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{serial}\n{err}");
    assert!(serial.contains("net ok pings=4 served=4"), "{serial}");
}
