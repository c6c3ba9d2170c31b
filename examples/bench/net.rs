//! Network and vsock rows: the test guest's `net-bench` on a TAP in a
//! network namespace the bench makes (and removes), under the reference
//! VMM and under QEMU microvm with a TAP netdev, against the host's own TAP
//! (a host program writing frames into a TAP, and reading them from one);
//! `vsock-bench` against a host Unix socket pair; and the transmit rate
//! limiter's accuracy at 1 ms and 100 ms refill times.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_kit::devices::test_utils::{self, HostLink, NetNs};
use vmm_kit::devices::virtio::net::Tap;
use vmm_kit::testguest::parse_output;

/// A namespace with three TAPs: ours (`tap0`, 172.16.0.1), QEMU's (`tap1`,
/// 172.16.1.1) and the floor's (`tapf`, 172.16.2.1).
pub fn namespace() -> NetNs {
    let ns = NetNs::new("bench");
    for (tap, addr) in [
        ("tap0", "172.16.0.1"),
        ("tap1", "172.16.1.1"),
        ("tapf", "172.16.2.1"),
    ] {
        ns.add_tap(tap, addr);
    }
    ns
}

/// A UDP frame to the guest's benchmark port (5001).
fn udp_frame(dst_mac: [u8; 6], src_ip: [u8; 4], dst_ip: [u8; 4], size: usize) -> Vec<u8> {
    test_utils::udp_frame(dst_mac, src_ip, dst_ip, 5001, size)
}

/// A packet socket on `ifname` (in the calling thread's namespace).
fn packet_socket(ifname: &str) -> HostLink {
    HostLink::bind(ifname).expect("a packet socket on the TAP")
}

fn blast(link: &HostLink, frame: &[u8], n: u64) {
    for _ in 0..n {
        let _ = link.send(frame);
    }
}

/// What one `net-bench` run measured.
pub struct NetRun {
    /// Guest to host, frames per second (the guest's own timing).
    pub tx_fps: f64,
    /// Ping round trip, microseconds.
    pub rtt_us: f64,
    /// Host to guest, frames per second while frames came.
    pub rx_fps: f64,
}

/// Runs `net-bench` under `cmd` (inside `ns`, on the TAP `ifname` whose
/// guest has `guest_ip` and MAC 06:00:ac:10:0X:02), host frames blasted
/// from a packet socket on that TAP when the guest is ready.
pub fn net_run(
    ns: &NetNs,
    mut cmd: Command,
    ifname: &str,
    subnet: u8,
    size: usize,
    iters: u64,
    tsc_ghz: f64,
) -> NetRun {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the VMM");
    let out = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        let ready = line.contains("net-bench rx-ready");
        lines.push(line);
        if ready {
            let frame = udp_frame(
                [0x06, 0, 0xac, 0x10, subnet, 0x02],
                [172, 16, subnet, 1],
                [172, 16, subnet, 2],
                size,
            );
            ns.run(|| blast(&packet_socket(ifname), &frame, iters));
        }
    }
    let _ = child.wait();
    let text = lines.join("\n");
    let reports = parse_output(&text);
    let find = |word: &str, key: &str| {
        reports
            .iter()
            .find(|r| r.event == "net-bench" && r.words.first().map(String::as_str) == Some(word))
            .and_then(|r| r.get_u64(key))
            .unwrap_or_else(|| panic!("no net-bench {word} {key}:\n{text}")) as f64
    };
    let hz = tsc_ghz * 1e9;
    NetRun {
        tx_fps: find("tx", "frames") / (find("tx", "cycles") / hz),
        rtt_us: find("ping", "cycles_per_rtt") / hz * 1e6,
        rx_fps: find("rx", "frames") / (find("rx", "cycles").max(1.0) / hz),
    }
}

/// The host's own TAP: frames per second a host program writes into a TAP
/// (with the virtio-net header, as a VMM does), and reads from one (batches
/// of 500 frames a packet socket queued on it, read back to back).
pub fn floor(ns: &NetNs, size: usize, iters: u64) -> (f64, f64) {
    ns.run(|| {
        let tap = Tap::open("tapf").expect("the floor's TAP");
        let mut frame = vec![0u8; 12];
        frame.extend(udp_frame([0xff; 6], [172, 16, 2, 2], [172, 16, 2, 1], size));
        let iov = [libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        }];
        let start = Instant::now();
        for _ in 0..iters {
            // SAFETY: one iovec over a local buffer.
            let _ = unsafe { tap.writev(&iov) };
        }
        let tx = iters as f64 / start.elapsed().as_secs_f64();
        // Reading: a batch the TAP's queue holds (500 frames) sent first,
        // then read back to back, timed.
        let sock = packet_socket("tapf");
        let blast_frame = udp_frame(
            [0x06, 0, 0xac, 0x10, 2, 0x02],
            [172, 16, 2, 1],
            [172, 16, 2, 2],
            size,
        );
        let mut buf = vec![0u8; 70_000];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let (mut n, mut spent) = (0u64, Duration::ZERO);
        for _ in 0..(iters / 500).max(1) {
            blast(&sock, &blast_frame, 500);
            let t = Instant::now();
            // SAFETY: one iovec over a local buffer.
            while let Ok(Some(_)) = unsafe { tap.readv(&iov) } {
                n += 1;
            }
            spent += t.elapsed();
        }
        let rx = n as f64 / spent.as_secs_f64().max(1e-9);
        (tx, rx)
    })
}

/// `vsock-bench` under the reference VMM: bytes per second guest to host
/// and back, with a host program that reads everything, then sends it back.
pub fn vsock_run(vmm: &std::path::Path, iters: u64, tsc_ghz: f64) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("vmmkit-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_52", uds.display())).expect("bind");
    let total = iters * 4096;
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("the guest connects");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n as u64,
            }
        }
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = chunk.len().min((total - sent) as usize);
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let out = Command::new(vmm)
        .args([
            "--vsock",
            &format!("cid=3,uds={}", uds.display()),
            "--cmdline",
            &format!("testguest.run=vsock-bench,exit testguest.bench_iters={iters}"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run the VMM");
    let _ = host.join();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let reports = parse_output(&text);
    let rate = |word: &str| {
        let r = reports
            .iter()
            .find(|r| r.event == "vsock-bench" && r.words.first().map(String::as_str) == Some(word))
            .unwrap_or_else(|| panic!("no vsock-bench {word}:\n{text}"));
        r.get_u64("bytes").unwrap_or(0) as f64
            / (r.get_u64("cycles").unwrap_or(1) as f64 / (tsc_ghz * 1e9))
    };
    (rate("tx"), rate("rx"))
}

/// The host floor for vsock: bytes per second through a Unix socket pair,
/// 4 KiB writes.
pub fn unix_floor(iters: u64) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("pair");
    let total = iters * 4096;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < total {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
    });
    let chunk = [0u8; 4096];
    let start = Instant::now();
    for _ in 0..iters {
        a.write_all(&chunk).expect("write");
    }
    let _ = reader.join();
    total as f64 / start.elapsed().as_secs_f64()
}

/// The transmit limiter at `rate` bytes per second with a `refill_ms`
/// refill: the guest sends 1514-byte frames as fast as it can for about a
/// second; returns (whole-run rate / limit, largest 20 ms window's rate /
/// limit, smallest 20 ms window's / limit), past the first 100 ms.
pub fn limiter_accuracy(
    ns: &NetNs,
    vmm: &std::path::Path,
    rate: u64,
    refill_ms: u64,
) -> (f64, f64, f64) {
    let frames = rate * 12 / 10 / 1514;
    let size = rate * refill_ms / 1000;
    let net = format!("tap=tap0,mac=06:00:ac:10:00:02,tx-bandwidth={size}/{refill_ms}");
    let cmdline = format!("console=ttyS0 testguest.run=net-bench,exit testguest.bench_iters={frames} testguest.net_size=1514");
    let times = ns.run(|| {
        let s = std::net::UdpSocket::bind("172.16.0.1:5001").expect("bind 5001");
        let big: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with a local int.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut child = Command::new(vmm)
            .args(["--net", &net, "--cmdline", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the VMM");
        let mut times = Vec::new();
        let mut buf = [0u8; 2048];
        while (times.len() as u64) < frames {
            match s.recv(&mut buf) {
                Ok(_) => times.push(Instant::now()),
                Err(_) => break,
            }
        }
        // The guest goes on to its ping and receive phases: not needed.
        let _ = child.kill();
        let _ = child.wait();
        times
    });
    if times.len() < 10 {
        return (0.0, 0.0, 0.0);
    }
    let start = times[0] + Duration::from_millis(100);
    let tail: Vec<Instant> = times.iter().copied().filter(|&t| t >= start).collect();
    let span = (*tail.last().expect("frames") - tail[0]).as_secs_f64();
    let whole = (tail.len() - 1) as f64 * 1514.0 / span / rate as f64;
    let window = Duration::from_millis(20);
    let mut rates = Vec::new();
    let mut w0 = tail[0];
    let mut count = 0u64;
    for &t in &tail {
        while t >= w0 + window {
            rates.push(count as f64 * 1514.0 / window.as_secs_f64() / rate as f64);
            w0 += window;
            count = 0;
        }
        count += 1;
    }
    let max = rates.iter().copied().fold(0.0, f64::max);
    let min = rates.iter().copied().fold(f64::MAX, f64::min);
    (whole, max, min)
}

/// The guest image's path for QEMU.
pub fn qemu_net(ns: &NetNs, image: &PathBuf, cmdline: &str) -> Command {
    let mut c = ns.command(std::path::Path::new("qemu-system-x86_64"));
    c.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        "tap,id=n0,ifname=tap1,script=no,downscript=no",
        "-device",
        "virtio-net-device,netdev=n0,mac=06:00:ac:10:01:02",
        "-kernel",
    ])
    .arg(image)
    .args(["-append", cmdline]);
    c
}
