//! Performance of the reference VMM against the floor, measured in one run.
//!
//! `cargo run --release --example bench [-- --repeats N --iters N]` (or
//! `scripts/bench.sh`, which also installs QEMU) prints a table of ratios.
//! Each figure is the median of N runs, with the minimum and maximum, for
//! the reference VMM, for QEMU's microvm machine on the very same guest image
//! (when `qemu-system-x86_64` is installed), and for the floor:
//!
//! - guest port I/O and MMIO exits (from a CPL3 loop in the test guest), in
//!   TSC cycles per exit, under the reference VMM and under the floor: a raw
//!   kvm-ioctls loop on the same guest that handles each exit inline;
//! - VMM process start to the guest's first instruction (its boot marker on
//!   the debug console, port 0xE9), to its first serial line and to the
//!   process's exit after a whole run (boot, hello, exit), against the
//!   floor's process start to the end of a VM that runs one instruction;
//! - with 1, 8 and 64 vCPUs: process start to the first instruction and to
//!   every vCPU up (the guest's `smp` scenario starts the APs and reports),
//!   against QEMU microvm with ACPI and `-smp`;
//! - peak resident memory of the whole VMM process booting the test guest
//!   (which touches about 1 MiB of its 128 MiB), against the floor's;
//! - virtio notify to used-buffer round trips (one-byte virtio-rng requests),
//!   polled and interrupt driven (no floor: QEMU is the peer);
//! - the management API: process start to the API socket answering a first
//!   request (`GET /`; QEMU: its QMP socket's greeting), and one request's
//!   round trip on an open connection (`GET /`; QEMU: QMP `query-status`),
//!   against the floor: this binary answering a fixed HTTP response on a
//!   Unix socket.

use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod net;
mod snapshot;

use clap::Parser;
use vmm_kit::boot::{boot_guest, BootConfig, ProtocolChoice};
use vmm_kit::core::vcpu::{apply_sregs, boot_regs};
use vmm_kit::kvm_ioctls::{Kvm, VcpuExit};
use vmm_kit::memory::{create_guest_ram, AddressMap, RamBacking};
use vmm_kit::testguest::parse_output;
use vmm_kit::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, Parser)]
struct Args {
    /// Runs per figure.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Exits per run of the exit loops.
    #[arg(long, default_value_t = 20_000)]
    iters: u64,
    /// Only the snapshot rows.
    #[arg(long)]
    snapshots_only: bool,
    /// Only the network, vsock and rate limiter rows (needs root, iproute2).
    #[arg(long)]
    net_only: bool,
    /// Internal: run the floor's one-instruction VM and exit.
    #[arg(long, hide = true)]
    floor_boot: bool,
    /// Internal: like --floor-boot, then stay up.
    #[arg(long, hide = true)]
    floor_boot_wait: bool,
    /// Internal: answer every HTTP request on this Unix socket with a fixed
    /// response (the API floor).
    #[arg(long, hide = true, value_name = "PATH")]
    floor_api: Option<PathBuf>,
}

/// The API floor: a process that binds a Unix socket and answers each
/// request with a fixed response, on one thread.
fn floor_api(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// One HTTP request on `s` and its whole answer.
fn http_get(s: &mut UnixStream) -> bool {
    if s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return head.starts_with("http/1.1 200");
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// QMP: the greeting line, then capabilities negotiated.
fn qmp_ready(s: &mut UnixStream) -> Option<BufReader<UnixStream>> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if !line.contains("QMP") {
        return None;
    }
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").ok()?;
    line.clear();
    r.read_line(&mut line).ok()?;
    line.contains("return").then_some(r)
}

/// One QMP `query-status` round trip.
fn qmp_query(s: &mut UnixStream, r: &mut BufReader<UnixStream>) -> bool {
    if s.write_all(b"{\"execute\":\"query-status\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.starts_with("{\"return\"") => return true,
            Ok(_) => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Api {
    Http,
    Qmp,
}

/// Starts `cmd`, which serves `api` on `sock`; returns the milliseconds
/// from its start to a first answer, and the median round trip of `calls`
/// requests on one connection in microseconds.
fn api_figures(cmd: &mut Command, sock: &Path, api: Api, calls: usize) -> (f64, f64) {
    let _ = std::fs::remove_file(sock);
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let deadline = t0 + Duration::from_secs(20);
    let (mut s, mut qmp) = loop {
        assert!(Instant::now() < deadline, "the API socket never answered");
        if let Ok(mut s) = UnixStream::connect(sock) {
            match api {
                Api::Http if http_get(&mut s) => break (s, None),
                Api::Qmp => {
                    if let Some(r) = qmp_ready(&mut s) {
                        break (s, Some(r));
                    }
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let ready = t0.elapsed().as_secs_f64() * 1e3;
    let mut each: Vec<f64> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            let ok = match (&mut qmp, api) {
                (Some(r), Api::Qmp) => qmp_query(&mut s, r),
                _ => http_get(&mut s),
            };
            assert!(ok, "an API call failed");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    each.sort_by(f64::total_cmp);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(sock);
    (ready, each[each.len() / 2])
}

/// Median, minimum and maximum.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn minimal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("bench binary");
    exe.parent().expect("examples dir").join("minimal")
}

/// The floor: the same guest and scenario in a raw kvm-ioctls loop.
fn floor_exit(scenario: &str, iters: u64) -> f64 {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("vm");
    vm.set_tss_address(0xfffb_d000).expect("tss");
    vm.create_irq_chip().expect("irqchip");
    let map = AddressMap::new(64 << 20).expect("map");
    let mem = create_guest_ram(&map, RamBacking::Anonymous).expect("ram");
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("host address") as u64;
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the mapping lives in `mem` until the end of this function,
        // longer than the VM that uses it.
        unsafe { vm.set_user_memory_region(r) }.expect("memslot");
    }
    let cmdline = format!("testguest.run={scenario} testguest.bench_iters={iters}");
    let config = BootConfig {
        protocol: ProtocolChoice::Auto,
        cmdline: &cmdline,
        acpi_rsdp: None,
    };
    let setup = boot_guest(
        &mem,
        &map,
        &mut Cursor::new(vmm_kit::testguest::IMAGE),
        None::<&mut Cursor<&[u8]>>,
        &config,
    )
    .expect("boot setup");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    apply_sregs(&mut sregs, &setup.cpu);
    vcpu.set_sregs(&sregs).expect("set sregs");
    vcpu.set_regs(&boot_regs(&setup.cpu)).expect("set regs");
    let mut serial = Vec::new();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, d) => serial.extend_from_slice(d),
            VcpuExit::IoOut(0xf4, _) => break,
            VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => {}
            VcpuExit::IoIn(0x3fd, d) => d.fill(0x60),
            VcpuExit::IoIn(_, d) => d.fill(0xff),
            VcpuExit::MmioRead(_, d) => d.fill(0),
            other => panic!("floor: unexpected exit {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&serial);
    let r = parse_output(&text)
        .into_iter()
        .find(|r| r.event == scenario)
        .expect("bench report");
    r.get_u64("cycles_per_op").expect("cycles_per_op") as f64
}

/// The floor's one-instruction VM, run in this process.
fn floor_boot_child(wait: bool) {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("vm");
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0x1000), 4096)])
            .expect("page");
    vm_memory::Bytes::write_obj(&mem, 0xf4u8, vm_memory::GuestAddress(0x1000)).expect("hlt");
    let host = mem
        .get_host_address(vm_memory::GuestAddress(0x1000))
        .expect("host address");
    let r = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0x1000,
        memory_size: 4096,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` outlives the VM, which ends with this function.
    unsafe { vm.set_user_memory_region(r) }.expect("memslot");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("regs");
    let exit = vcpu.run().expect("KVM_RUN");
    assert!(matches!(exit, VcpuExit::Hlt), "floor: {exit:?}");
    if wait {
        // Stay up, VM and all, while the parent reads our memory use.
        println!("testguest: spin (floor)");
        std::thread::sleep(Duration::from_secs(30));
    }
}

/// Process start to the end of the floor's one-instruction VM.
fn floor_first_instruction() -> f64 {
    let start = Instant::now();
    let status = Command::new(std::env::current_exe().expect("bench binary"))
        .arg("--floor-boot")
        .status()
        .expect("floor child");
    assert!(status.success());
    start.elapsed().as_secs_f64() * 1e3
}

/// The test guest image as a file, for QEMU.
fn guest_image_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmm-kit-bench-guest-{}.elf", std::process::id()));
    std::fs::write(&path, vmm_kit::testguest::IMAGE).expect("write the guest image");
    path
}

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// QEMU's microvm on the test guest, with `extra` device arguments.
fn qemu_command(image: &PathBuf, cmdline: &str, extra: &[&str]) -> Command {
    qemu_command_on("microvm,acpi=off", image, cmdline, extra)
}

/// QEMU on `machine` (microvm with its options) on the test guest.
fn qemu_command_on(machine: &str, image: &PathBuf, cmdline: &str, extra: &[&str]) -> Command {
    qemu_command_mem(machine, image, cmdline, "128", extra)
}

/// QEMU on `machine` with `mem` MiB of RAM on the test guest.
fn qemu_command_mem(
    machine: &str,
    image: &PathBuf,
    cmdline: &str,
    mem: &str,
    extra: &[&str],
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        mem,
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    // The modern (version 2) virtio-mmio interface, as ours.
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .arg("-kernel")
    .arg(image)
    .args(["-append", cmdline])
    .args(extra);
    c
}

/// Runs `cmd` (a VMM on the test guest) and returns the `cycles_per_op` of
/// the report named `scenario`.
fn cycles_of(cmd: &mut Command, scenario: &str) -> f64 {
    let out = cmd.stdin(Stdio::null()).output().expect("run the VMM");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_output(&text)
        .into_iter()
        .find(|r| r.event == scenario && r.get("cycles_per_op").is_some())
        .and_then(|r| r.get_u64("cycles_per_op"))
        .unwrap_or_else(|| panic!("no {scenario} report from {cmd:?}:\n{text}")) as f64
}

/// Runs `cmd` (a VMM on the test guest's `bench-blk`) and returns cycles per
/// request of each workload.
fn blk_cycles(cmd: &mut Command) -> Vec<(String, f64)> {
    let out = cmd.stdin(Stdio::null()).output().expect("run the VMM");
    let text = String::from_utf8_lossy(&out.stdout);
    let loads: Vec<(String, f64)> = parse_output(&text)
        .into_iter()
        .filter(|r| r.event == "bench-blk")
        .filter_map(|r| {
            Some((
                r.get("load")?.to_string(),
                r.get_u64("cycles_per_op")? as f64,
            ))
        })
        .collect();
    assert_eq!(
        loads.len(),
        BLK_LOADS.len(),
        "bench-blk reports from {cmd:?}:\n{text}"
    );
    loads
}

/// The workloads of the guest's `bench-blk`: name, bytes, random, write.
const BLK_LOADS: [(&str, usize, bool, bool); 6] = [
    ("randread-4k-qd1", 4096, true, false),
    ("randwrite-4k-qd1", 4096, true, true),
    ("randread-4k-qd32", 4096, true, false),
    ("randwrite-4k-qd32", 4096, true, true),
    ("read-128k", 128 * 1024, false, false),
    ("write-128k", 128 * 1024, false, true),
];

/// The floor of a block workload: the host's own pread/pwrite on the same
/// file, one request at a time, in TSC cycles per request.
fn host_io_cycles(
    path: &PathBuf,
    bytes: usize,
    random: bool,
    write: bool,
    iters: usize,
    tsc_ghz: f64,
) -> f64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("bench image");
    let span = f.metadata().expect("image size").len() / bytes as u64;
    let mut buf = vec![0u8; bytes];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    for i in 0..iters as u64 {
        let slot = if random {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % span
        } else {
            (i + 1) % span
        };
        let at = slot * bytes as u64;
        if write {
            f.write_all_at(&buf, at).expect("pwrite");
        } else {
            f.read_exact_at(&mut buf, at).expect("pread");
        }
    }
    start.elapsed().as_nanos() as f64 * tsc_ghz / iters as f64
}

/// A 64 MiB image with non-zero data, for the block workloads.
fn bench_disk() -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmm-kit-bench-disk-{}.img", std::process::id()));
    let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let mut data = Vec::with_capacity(64 << 20);
    for _ in 0..64 {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&path, data).expect("write the bench disk");
    path
}

/// Process start to the first byte `cmd` writes on stderr (the guest's boot
/// marker on the debug console), in ms.
fn first_marker_ms(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the VMM");
    let mut err = child.stderr.take().expect("stderr");
    let mut byte = [0u8; 1];
    loop {
        std::io::Read::read_exact(&mut err, &mut byte).expect("marker");
        if byte[0] == b'!' {
            break;
        }
    }
    let t = start.elapsed();
    let _ = std::io::copy(&mut err, &mut std::io::sink());
    let _ = child.wait();
    t.as_secs_f64() * 1e3
}

/// Process start to process exit of `cmd` (a whole run of the guest), in ms.
fn whole_run_ms(cmd: &mut Command) -> f64 {
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the VMM");
    let t = start.elapsed();
    assert!(status.code().is_some(), "{cmd:?} was killed: {status:?}");
    t.as_secs_f64() * 1e3
}

/// Process start to the first `testguest:` line of `cmd`, in ms.
fn first_line_ms(cmd: &mut Command) -> f64 {
    until_line_ms(cmd, "testguest:")
}

/// Process start to the first line of `cmd` that starts with `prefix`, in
/// ms.
fn until_line_ms(cmd: &mut Command, prefix: &str) -> f64 {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the VMM");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.starts_with(prefix) {
        line.clear();
        if out.read_line(&mut line).expect("read") == 0 {
            panic!("the VMM printed no {prefix:?} line");
        }
    }
    let t = start.elapsed();
    let _ = std::io::copy(&mut out, &mut std::io::sink());
    let _ = child.wait();
    t.as_secs_f64() * 1e3
}

/// Starts `cmd`, waits until it prints a line starting with `marker` (the
/// guest has booted and now spins), reads the process's peak resident set
/// (`VmHWM`, which counts this program only, not the one that started it),
/// then kills it. In MiB.
fn peak_rss_mib(cmd: &mut Command, marker: &str) -> f64 {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.starts_with(marker) {
        line.clear();
        if out.read_line(&mut line).expect("read") == 0 {
            panic!("{cmd:?} ended before printing {marker:?}");
        }
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("/proc status");
    let _ = child.kill();
    let _ = child.wait();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024.0
}

fn measure(repeats: usize, mut f: impl FnMut() -> f64) -> Stat {
    stat((0..repeats).map(|_| f()).collect())
}

fn cell(s: Option<Stat>) -> String {
    s.map_or("n/a".into(), |s| {
        format!("{:.1} ({:.1}-{:.1})", s.median, s.min, s.max)
    })
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a.median / b.median),
        _ => "-".into(),
    }
}

fn row(name: &str, ours: Stat, qemu: Option<Stat>, floor: Option<Stat>) {
    println!(
        "| {name} | {} | {} | {} | {} | {} |",
        cell(Some(ours)),
        cell(qemu),
        cell(floor),
        ratio(Some(ours), qemu),
        ratio(Some(ours), floor)
    );
}

fn main() {
    let args = Args::parse();
    if args.floor_boot || args.floor_boot_wait {
        floor_boot_child(args.floor_boot_wait);
        return;
    }
    if let Some(path) = &args.floor_api {
        floor_api(path);
        return;
    }
    let r = args.repeats.max(1);
    let tsc_ghz = tsc_ghz();
    let qemu = qemu_available();
    let image = guest_image_file();
    println!(
        "TSC: {tsc_ghz:.3} GHz; each figure: median (min-max) of {r} runs; QEMU: {}\n",
        if qemu { "yes" } else { "not installed" }
    );
    println!("| figure | ours | QEMU microvm | floor | ours / QEMU | ours / floor |");
    println!("|---|---|---|---|---|---|");
    if args.snapshots_only {
        snapshot_rows(r, qemu, &image);
        let _ = std::fs::remove_file(&image);
        return;
    }
    if args.net_only {
        net_rows(r, qemu, &image, tsc_ghz);
        let _ = std::fs::remove_file(&image);
        return;
    }
    let qemu_stat = |f: &mut dyn FnMut() -> f64| qemu.then(|| measure(r, f));
    for (scenario, name) in [
        ("bench-pio", "port I/O exit, cycles"),
        ("bench-mmio", "MMIO exit, cycles"),
    ] {
        let cmdline = format!(
            "testguest.run={scenario} testguest.bench_iters={}",
            args.iters
        );
        let ours = measure(r, || {
            cycles_of(
                Command::new(minimal_bin()).args(["--cmdline", &cmdline]),
                scenario,
            )
        });
        let q = qemu_stat(&mut || cycles_of(&mut qemu_command(&image, &cmdline, &[]), scenario));
        let floor = measure(r, || floor_exit(scenario, args.iters));
        row(name, ours, q, Some(floor));
    }
    for (scenario, name) in [
        ("bench-virtio", "virtio notify to used, polled, cycles"),
        (
            "bench-virtio-irq",
            "virtio notify to used interrupt, cycles",
        ),
    ] {
        let cmdline = format!(
            "testguest.run={scenario} testguest.bench_iters={}",
            args.iters / 10
        );
        let ours = measure(r, || {
            cycles_of(
                Command::new(minimal_bin()).args(["--rng", "--cmdline", &cmdline]),
                scenario,
            )
        });
        let q = qemu_stat(&mut || {
            cycles_of(
                &mut qemu_command(&image, &cmdline, &["-device", "virtio-rng-device"]),
                scenario,
            )
        });
        row(name, ours, q, None);
    }
    let disk = bench_disk();
    let disk_arg = disk.to_str().expect("utf-8 temp path").to_string();
    let iters = (args.iters / 10) as usize;
    let blk_cmdline = format!("testguest.run=bench-blk testguest.bench_iters={iters}");
    let ours_runs: Vec<Vec<(String, f64)>> = (0..r)
        .map(|_| {
            blk_cycles(Command::new(minimal_bin()).args([
                "--disk",
                &disk_arg,
                "--cmdline",
                &blk_cmdline,
            ]))
        })
        .collect();
    let drive = format!("id=d0,file={disk_arg},format=raw,if=none");
    let qemu_blk = ["-drive", &drive, "-device", "virtio-blk-device,drive=d0"];
    let qemu_runs: Option<Vec<Vec<(String, f64)>>> = qemu.then(|| {
        (0..r)
            .map(|_| blk_cycles(&mut qemu_command(&image, &blk_cmdline, &qemu_blk)))
            .collect()
    });
    for (i, (name, bytes, random, write)) in BLK_LOADS.iter().enumerate() {
        let ours = stat(ours_runs.iter().map(|run| run[i].1).collect());
        let q = qemu_runs
            .as_ref()
            .map(|runs| stat(runs.iter().map(|run| run[i].1).collect()));
        let floor = measure(r, || {
            host_io_cycles(&disk, *bytes, *random, *write, iters, tsc_ghz)
        });
        let host_call = if *write { "pwrite" } else { "pread" };
        row(
            &format!("virtio-blk {name}, cycles/request (floor: host {host_call}, one at a time)"),
            ours,
            q,
            Some(floor),
        );
    }
    let _ = std::fs::remove_file(&disk);
    let spin = "testguest.run=hello,spin";
    let ours = measure(r, || {
        peak_rss_mib(
            Command::new(minimal_bin()).args(["--mem", "128", "--cmdline", spin]),
            "testguest: spin",
        )
    });
    let q =
        qemu_stat(&mut || peak_rss_mib(&mut qemu_command(&image, spin, &[]), "testguest: spin"));
    let floor = measure(r, || {
        let mut c = Command::new(std::env::current_exe().expect("bench binary"));
        peak_rss_mib(c.arg("--floor-boot-wait"), "testguest: spin")
    });
    row(
        "peak RSS of the whole process, MiB (128 MiB guest, booted)",
        ours,
        q,
        Some(floor),
    );
    let ours = measure(r, || {
        first_marker_ms(Command::new(minimal_bin()).arg("--debugcon"))
    });
    let q = qemu_stat(&mut || {
        first_marker_ms(&mut qemu_command(
            &image,
            "testguest.run=hello",
            &[
                "-chardev",
                "file,id=dbg,path=/dev/stderr",
                "-device",
                "isa-debugcon,iobase=0xe9,chardev=dbg",
            ],
        ))
    });
    let floor = measure(r, floor_first_instruction);
    row(
        "process start to the guest's first instruction, ms (floor: to a 1-instruction VM's end)",
        ours,
        q,
        Some(floor),
    );
    let ours = measure(r, || first_line_ms(&mut Command::new(minimal_bin())));
    let q = qemu_stat(&mut || first_line_ms(&mut qemu_command(&image, "testguest.run=hello", &[])));
    let floor = measure(r, floor_first_instruction);
    row(
        "process start to first serial line, ms (floor: to a 1-instruction VM's end)",
        ours,
        q,
        Some(floor),
    );
    for n in [1u32, 8, 64] {
        let vcpus = n.to_string();
        let ours = measure(r, || {
            first_marker_ms(Command::new(minimal_bin()).args(["--debugcon", "--vcpus", &vcpus]))
        });
        let q = qemu_stat(&mut || {
            first_marker_ms(&mut qemu_command_on(
                "microvm,acpi=on",
                &image,
                "testguest.run=hello",
                &[
                    "-smp",
                    &vcpus,
                    "-chardev",
                    "file,id=dbg,path=/dev/stderr",
                    "-device",
                    "isa-debugcon,iobase=0xe9,chardev=dbg",
                ],
            ))
        });
        row(
            &format!("{n} vCPUs: process start to the guest's first instruction, ms"),
            ours,
            q,
            None,
        );
        let ours = measure(r, || {
            until_line_ms(
                Command::new(minimal_bin()).args([
                    "--vcpus",
                    &vcpus,
                    "--cmdline",
                    "testguest.run=smp",
                ]),
                "testguest: smp",
            )
        });
        let q = qemu_stat(&mut || {
            until_line_ms(
                &mut qemu_command_on(
                    "microvm,acpi=on",
                    &image,
                    "testguest.run=smp",
                    &["-smp", &vcpus],
                ),
                "testguest: smp",
            )
        });
        row(
            &format!("{n} vCPUs: process start to every vCPU up (the guest's smp report), ms"),
            ours,
            q,
            None,
        );
    }
    let sock = std::env::temp_dir().join(format!("vmm-kit-bench-{}.sock", std::process::id()));
    let sock_arg = sock.to_str().expect("utf-8 temp path").to_string();
    let figures = |api: Api, cmd: &mut dyn FnMut() -> Command| -> (Stat, Stat) {
        let runs: Vec<(f64, f64)> = (0..r)
            .map(|_| api_figures(&mut cmd(), &sock, api, 200))
            .collect();
        (
            stat(runs.iter().map(|x| x.0).collect()),
            stat(runs.iter().map(|x| x.1).collect()),
        )
    };
    let ours = figures(Api::Http, &mut || {
        let mut c = Command::new(minimal_bin());
        c.args(["--api-sock", &sock_arg]);
        c
    });
    let q = qemu.then(|| {
        figures(Api::Qmp, &mut || {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                "microvm",
                "-enable-kvm",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-S",
                "-qmp",
                &format!("unix:{sock_arg},server=on,wait=off"),
            ]);
            c
        })
    });
    let floor = figures(Api::Http, &mut || {
        let mut c = Command::new(std::env::current_exe().expect("bench binary"));
        c.args(["--floor-api", &sock_arg]);
        c
    });
    row(
        "process start to the API answering (GET /; QEMU: QMP greeting), ms",
        ours.0,
        q.map(|q| q.0),
        Some(floor.0),
    );
    row(
        "API round trip on an open connection (GET /; QEMU: QMP query-status), us",
        ours.1,
        q.map(|q| q.1),
        Some(floor.1),
    );
    snapshot_rows(r, qemu, &image);
    net_rows(r, qemu, &image, tsc_ghz);
    let whole = "testguest.run=hello,exit testguest.exit=0";
    let ours = measure(r, || {
        whole_run_ms(Command::new(minimal_bin()).args(["--cmdline", whole]))
    });
    let q = qemu_stat(&mut || whole_run_ms(&mut qemu_command(&image, whole, &[])));
    let floor = measure(r, floor_first_instruction);
    row(
        "whole run: process start to exit (boot, hello, exit), ms (floor: a 1-instruction VM)",
        ours,
        q,
        Some(floor),
    );
    let _ = std::fs::remove_file(&image);
}

/// The snapshot rows (see the `snapshot` module).
fn snapshot_rows(r: usize, qemu: bool, image: &PathBuf) {
    type Rounds = Vec<snapshot::Round>;
    let runs = |f: &dyn Fn() -> snapshot::Round| -> Rounds { (0..r).map(|_| f()).collect() };
    let pick = |v: &Rounds, f: fn(&snapshot::Round) -> f64| stat(v.iter().map(f).collect());
    let lazy = runs(&|| snapshot::ours(image, 128, false));
    let eager = runs(&|| snapshot::ours(image, 128, true));
    let big = runs(&|| snapshot::ours(image, 1024, false));
    let q = qemu.then(|| runs(&|| snapshot::qemu(image, 128)));
    let q_big = qemu.then(|| runs(&|| snapshot::qemu(image, 1024)));
    let create = |x: &snapshot::Round| x.create_ms;
    let restore = |x: &snapshot::Round| x.restore_ms;
    row(
        "snapshot creation, paused 128 MiB guest with 120 MiB written, ms (QEMU: migrate to a file)",
        pick(&lazy, create),
        q.as_ref().map(|q| pick(q, create)),
        None,
    );
    row(
        "snapshot creation, paused 1 GiB guest with 1016 MiB written, ms",
        pick(&big, create),
        q_big.as_ref().map(|q| pick(q, create)),
        None,
    );
    let floor = measure(r, floor_first_instruction);
    row(
        "restore, process start to the guest's next instruction, 128 MiB, ms (QEMU: -incoming, then QMP cont; floor: a 1-instruction VM)",
        pick(&lazy, restore),
        q.as_ref().map(|q| pick(q, restore)),
        Some(floor),
    );
    row(
        "restore as above, 1 GiB, ms",
        pick(&big, restore),
        q_big.as_ref().map(|q| pick(q, restore)),
        Some(floor),
    );
    row(
        "restore as above, 128 MiB copied in eagerly (--restore-eager), ms",
        pick(&eager, restore),
        None,
        Some(floor),
    );
    row(
        "PUT /snapshot/load with resume_vm, the call alone, 128 MiB, ms (Firecracker here: about 22)",
        measure(r, || snapshot::ours_load_call(image, 128)),
        None,
        None,
    );
    let (_dir, file) = snapshot::memory_file(image, 128);
    row(
        "first write to a page of a cold-booted guest, cycles (floor: host, fresh anonymous memory)",
        pick(&lazy, |x| x.cold_cycles),
        q.as_ref().map(|q| pick(q, |x| x.cold_cycles)),
        Some(measure(r, || snapshot::host_touch_cycles(128 << 20, None))),
    );
    row(
        "first write to a page after a lazy restore, cycles (QEMU: after -incoming; floor: host, private mapping of the memory file)",
        pick(&lazy, |x| x.restored_cycles),
        q.as_ref().map(|q| pick(q, |x| x.restored_cycles)),
        Some(measure(r, || snapshot::host_touch_cycles(128 << 20, Some(&file)))),
    );
    row(
        "first write to a page after an eager restore, cycles",
        pick(&eager, |x| x.restored_cycles),
        None,
        None,
    );
}

/// The network, vsock and rate limiter rows (see the `net` module).
fn net_rows(r: usize, qemu: bool, image: &PathBuf, tsc_ghz: f64) {
    let ns = net::namespace();
    let iters = 20_000u64;
    for size in [1514usize, 64] {
        let cmdline = |ip: u8| {
            format!(
                "console=ttyS0 testguest.run=net-bench,exit testguest.bench_iters={iters} testguest.net_size={size} testguest.ip=172.16.{ip}.2 testguest.peer=172.16.{ip}.1"
            )
        };
        let ours_cmd = || {
            let mut c = ns.command(&minimal_bin());
            c.args([
                "--net",
                "tap=tap0,mac=06:00:ac:10:00:02",
                "--cmdline",
                &cmdline(0),
            ]);
            c
        };
        let ours: Vec<net::NetRun> = (0..r)
            .map(|_| net::net_run(&ns, ours_cmd(), "tap0", 0, size, iters, tsc_ghz))
            .collect();
        let q: Option<Vec<net::NetRun>> = qemu.then(|| {
            (0..r)
                .map(|_| {
                    net::net_run(
                        &ns,
                        net::qemu_net(&ns, image, &cmdline(1)),
                        "tap1",
                        1,
                        size,
                        iters,
                        tsc_ghz,
                    )
                })
                .collect()
        });
        let floors: Vec<(f64, f64)> = (0..r).map(|_| net::floor(&ns, size, iters)).collect();
        let pick = |v: &[net::NetRun], f: fn(&net::NetRun) -> f64| stat(v.iter().map(f).collect());
        row(
            &format!("guest to host, {size}-byte frames, thousand frames/s (higher is better; floor: a host program writing into a TAP)"),
            pick(&ours, |x| x.tx_fps / 1e3),
            q.as_ref().map(|q| pick(q, |x| x.tx_fps / 1e3)),
            Some(stat(floors.iter().map(|f| f.0 / 1e3).collect())),
        );
        row(
            &format!("host to guest, {size}-byte frames, thousand frames/s while they came (floor: a host program reading frames queued on a TAP)"),
            pick(&ours, |x| x.rx_fps / 1e3),
            q.as_ref().map(|q| pick(q, |x| x.rx_fps / 1e3)),
            Some(stat(floors.iter().map(|f| f.1 / 1e3).collect())),
        );
        if size == 1514 {
            row(
                "ping round trip, guest to the host's stack over the TAP, us",
                pick(&ours, |x| x.rtt_us),
                q.as_ref().map(|q| pick(q, |x| x.rtt_us)),
                None,
            );
        }
    }
    let vs: Vec<(f64, f64)> = (0..r)
        .map(|_| net::vsock_run(&minimal_bin(), 20_000, tsc_ghz))
        .collect();
    let unix = measure(r, || net::unix_floor(20_000) / 1e6);
    row(
        "vsock guest to host, 4 KiB packets, MB/s (higher is better; floor: a host Unix socket pair)",
        stat(vs.iter().map(|v| v.0 / 1e6).collect()),
        None,
        Some(unix),
    );
    row(
        "vsock host to guest, MB/s",
        stat(vs.iter().map(|v| v.1 / 1e6).collect()),
        None,
        Some(unix),
    );
    for refill in [1u64, 100] {
        let acc: Vec<(f64, f64, f64)> = (0..r)
            .map(|_| net::limiter_accuracy(&ns, &minimal_bin(), 10_000_000, refill))
            .collect();
        row(
            &format!("transmit limit 10 MB/s, refill {refill} ms: whole run, % of the limit"),
            stat(acc.iter().map(|a| a.0 * 100.0).collect()),
            None,
            None,
        );
        row(
            &format!(
                "transmit limit 10 MB/s, refill {refill} ms: busiest 20 ms window, % of the limit"
            ),
            stat(acc.iter().map(|a| a.1 * 100.0).collect()),
            None,
            None,
        );
        row(
            &format!(
                "transmit limit 10 MB/s, refill {refill} ms: quietest 20 ms window, % of the limit"
            ),
            stat(acc.iter().map(|a| a.2 * 100.0).collect()),
            None,
            None,
        );
    }
}

/// The TSC rate, measured against the monotonic clock.
fn tsc_ghz() -> f64 {
    // SAFETY: rdtsc has no side effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let c0 = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / c0.elapsed().as_nanos() as f64
}
