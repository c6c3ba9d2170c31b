//! The reference VMM: a thin command line over the crate family.
//!
//! `cargo run --example minimal` boots the embedded test guest, prints its
//! serial output and exits with a status that tells the guest's status
//! apart from the VMM's own. See `--help`.
//!
//! With `--api-sock PATH` it serves Firecracker's REST API on that socket
//! and boots when a client sends `InstanceStart`; with `--config-file PATH`
//! it boots at once from a Firecracker-shaped JSON description (and with
//! `--api-sock` too, serves the post-boot calls).

mod jail;

use std::io::{IsTerminal, Read};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::{Parser, ValueEnum};
use vmm_kit::api::logger::ApiLogger;
use vmm_kit::api::model::FullVmConfiguration;
use vmm_kit::api::{Api, ApiServer};
use vmm_kit::boot::{inspect_kernel, BootProtocol, ProtocolChoice};
use vmm_kit::core::host_io::{get_termios, set_raw, set_termios};
use vmm_kit::core::snapshot::{read_state_file, RestoreConfig, SnapshotState};
use vmm_kit::core::{
    exit_status, seccomp, ConsoleConfig, DiskConfig, HostIo, KernelSource, NetConfig,
    SeccompPolicy, SerialConfig, StopCause, TapSource, ThreadKind, VmBuilder, VmConfig,
    VmController, VmEvent, VmEventSender, VmExit, VsockConfig, DEFAULT_CMDLINE,
};
use vmm_kit::devices::host_files::{open_input, InputKind, OutputMode};
use vmm_kit::devices::legacy::DEBUG_EXIT_PORT;
use vmm_kit::devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use vmm_kit::memory::RamBacking;

const STATUSES: &str = "\
Exit status (the guest's statuses are even, the VMM's own odd, so they never collide):
  2*N   the guest wrote status N (0-127) to the debug-exit port (N > 127: 254)
  0     the guest ended without a status: reset, power-off, halt
  1     the VMM could not build or run the VM (the reason is on stderr)
  3     bad command-line flags
  5     the guest crashed (triple fault, or a crash it reported)
  7     stopped on request: Ctrl-A x at the console, InstanceStop over the API
  159   a VMM thread made a system call its seccomp filter forbids
  SIGINT, SIGTERM, SIGHUP: the VM stops in order (vCPUs out, pending disk
  requests finished, disks flushed, the terminal restored), then the VMM ends
  by that same signal (a shell reports 130, 143, 129).";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Protocol {
    /// PVH when the image has the Xen note, else the 64-bit Linux protocol.
    Auto,
    /// The 64-bit Linux boot protocol.
    Linux64,
    /// The Xen PVH protocol.
    Pvh,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// A shared memfd.
    Memfd,
    /// 2 MiB huge pages (fails if the host has too few).
    Hugepages,
}

/// Where COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Serial {
    Stdio,
    File(PathBuf, OutputMode),
    Pty,
    None,
}

/// A minimal VMM on KVM: boots a kernel (or the embedded test guest) with a
/// serial console and exits with a status that tells the guest's apart from
/// its own.
#[derive(Debug, Parser)]
#[command(version, after_help = STATUSES)]
struct Args {
    /// Kernel image: ELF vmlinux, PVH ELF or bzImage. Without it, the
    /// embedded test guest boots.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM: a number of MiB, or with a unit: 512M, 2G, 1024MiB.
    #[arg(long, value_name = "SIZE", default_value = "128", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs, 1-254 (more than the host has CPUs: a warning).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Boot protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Auto)]
    boot_protocol: Protocol,
    /// What backs guest RAM.
    #[arg(long, value_enum, default_value_t = Backing::Anonymous)]
    memory_backing: Backing,
    /// Port of the debug-exit device (the guest writes its status there).
    #[arg(long, value_name = "PORT", default_value_t = DEBUG_EXIT_PORT, value_parser = parse_port)]
    exit_port: u16,
    /// A virtio-blk disk on a raw image, locked against other users (shared
    /// when ro): PATH[,ro][,id=SERIAL][,nolock][,bandwidth=SIZE/MS[+BURST]]
    /// [,ops=N/MS[+BURST]] (token buckets: SIZE bytes or N requests every MS
    /// milliseconds, with a one-time BURST). Repeatable.
    #[arg(long, value_name = "PATH[,ro][,id=SERIAL][,nolock][,bandwidth=..][,ops=..]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net NIC on a host TAP interface (made beforehand, e.g.
    /// `ip tuntap add tap0 mode tap`), or on a TAP this process inherited
    /// open (`fd=N`, opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR):
    /// `tap=NAME|fd=N[,id=ID][,mac=MAC][,rx-bandwidth=SIZE/MS[+BURST]]`
    /// `[,rx-ops=...][,tx-bandwidth=...][,tx-ops=...]` (a token bucket of
    /// SIZE bytes or operations refilled every MS milliseconds, with a
    /// one-time BURST). The id defaults to eth0, eth1, ... Repeatable.
    #[arg(long, value_name = "tap=NAME|fd=N[,id=ID][,mac=MAC][,LIMIT...]", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// A virtio-vsock device with Firecracker's host side: `cid=N,uds=PATH`
    /// (the guest's context id, 3 or more; host programs connect to the
    /// Unix socket PATH and write `CONNECT <port>\n`; guest connections to
    /// port P reach PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-console: `stdout` (output to stdout, input from stdin) or
    /// `file=PATH[,append]` (output to PATH, emptied first unless append).
    #[arg(long, value_name = "stdout|file=PATH[,append]", value_parser = parse_console)]
    console: Option<ConsoleConfig>,
    /// Where COM1 goes: `stdio` (stdout and stdin; on a terminal, raw, with
    /// Ctrl-A x to quit), `file=PATH[,append]` (emptied first unless
    /// append), `pty` (a new pseudo-terminal, its path on stderr) or `none`.
    #[arg(long, value_name = "stdio|file=PATH[,append]|pty|none", default_value = "stdio", value_parser = parse_serial)]
    serial: Serial,
    /// Do not announce the virtio devices with `virtio_mmio.device=` entries
    /// on the kernel command line (the ACPI DSDT describes them anyway).
    #[arg(long)]
    no_virtio_cmdline: bool,
    /// Put a debug console on port 0xE9 (as Bochs and QEMU's isa-debugcon),
    /// its output on stderr. The test guest writes '!' there at its first
    /// instruction.
    #[arg(long)]
    debugcon: bool,
    /// Run without seccomp filters (for debugging: a blocked system call
    /// ends the VMM with status 159 and names the call).
    #[arg(long)]
    no_seccomp: bool,
    /// Print what a kernel image is and which boot protocols it supports,
    /// then exit without booting.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initrd"])]
    inspect_kernel: Option<PathBuf>,
    /// Serve Firecracker's REST API on this Unix socket. Without
    /// --config-file, the VM boots when a client sends InstanceStart (the
    /// flags above set the defaults; --kernel is not the test guest's
    /// default here: PUT /boot-source gives the kernel).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,
    /// Boot at once from a Firecracker-shaped JSON description
    /// (boot-source, machine-config, drives, entropy, logger, metrics),
    /// applied over the flags.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Serve no API (the default without --api-sock).
    #[arg(long)]
    no_api: bool,
    /// The instance id `GET /` reports.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    /// Run in a jail named ID (needs root): new PID, mount, IPC, UTS and
    /// network namespaces, a read-only root holding only /dev/kvm,
    /// /dev/net/tun and the files named by the flags and the config file,
    /// cgroup limits, every other descriptor closed, then the VMM runs as
    /// --jail-uid/--jail-gid. The launcher waits, relays signals, ends as
    /// the VMM ends and removes the jail.
    #[arg(long, value_name = "ID", requires_all = ["jail_uid", "jail_gid"])]
    jail: Option<String>,
    /// The user the jailed VMM runs as (not 0).
    #[arg(long, value_name = "UID", requires = "jail")]
    jail_uid: Option<u32>,
    /// The group the jailed VMM runs as (not 0).
    #[arg(long, value_name = "GID", requires = "jail")]
    jail_gid: Option<u32>,
    /// Where jail directories are made (each at DIR/ID).
    #[arg(long, value_name = "DIR", default_value = jail::DEFAULT_BASE, requires = "jail")]
    jail_base: PathBuf,
    /// Join this network namespace (such as /var/run/netns/NAME) instead of
    /// a new, empty one.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_netns: Option<PathBuf>,
    /// CPU time limit, in CPUs (0.5, 2).
    #[arg(long, value_name = "CPUS", requires = "jail")]
    jail_cpus: Option<f64>,
    /// Memory limit of the jail (guest RAM counts once touched): 512M, 2G.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, requires = "jail")]
    jail_memory: Option<u64>,
    /// An I/O limit: "MAJ:MIN rbps=N wbps=N riops=N wiops=N". Repeatable.
    #[arg(long, value_name = "LIMITS", requires = "jail")]
    jail_io: Vec<String>,
    /// One more host file or directory to show in the jail (read-only; with
    /// `,rw`, writable): PATH[,rw]. Repeatable.
    #[arg(long, value_name = "PATH[,rw]", requires = "jail")]
    jail_bind: Vec<String>,
    /// Restore the snapshot whose state file this is, instead of booting
    /// (the machine is the snapshot's: --kernel, --mem, --vcpus, --disk,
    /// --rng are not used; the host's side, --serial, --console, seccomp,
    /// still is). Needs --restore-memory.
    #[arg(long, value_name = "STATE", requires = "restore_memory", conflicts_with_all = ["kernel", "initrd", "config_file", "disk", "net", "vsock"])]
    restore: Option<PathBuf>,
    /// A memory file of the snapshot: the full snapshot's first, then each
    /// diff snapshot's in the order they were taken. Repeatable.
    #[arg(long, value_name = "PATH", requires = "restore")]
    restore_memory: Vec<PathBuf>,
    /// Copy the snapshot's memory in at once (into --memory-backing RAM)
    /// instead of mapping the file and reading pages as the guest touches
    /// them.
    #[arg(long, requires = "restore")]
    restore_eager: bool,
    /// Put the snapshot's disk ID on another image of the same size (each
    /// clone its own copy): ID=PATH. Repeatable.
    #[arg(long, value_name = "ID=PATH", requires = "restore", value_parser = parse_disk_override)]
    restore_disk: Vec<(String, PathBuf)>,
    /// Put the snapshot's NIC ID on another TAP interface (each clone its
    /// own): ID=TAP. Repeatable.
    #[arg(long, value_name = "ID=TAP", requires = "restore", value_parser = parse_net_override)]
    restore_net: Vec<(String, String)>,
    /// Listen for vsock host programs on this Unix socket instead of the
    /// one the snapshot names (each clone its own).
    #[arg(long, value_name = "PATH", requires = "restore")]
    restore_vsock: Option<PathBuf>,
    /// Restore paused (resume with the API's PATCH /vm).
    #[arg(long, requires = "restore")]
    restore_paused: bool,
    /// Track the pages the guest writes, so that diff snapshots can be
    /// taken (PUT /snapshot/create with snapshot_type Diff).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Merge diff snapshot memory files into a full one, in order, then
    /// exit: BASE LAYER [LAYER...]. BASE is changed in place.
    #[arg(long, value_name = "FILE", num_args = 2.., conflicts_with_all = ["kernel", "restore", "api_sock", "config_file"])]
    merge_memory: Vec<PathBuf>,
}

fn parse_disk_override(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok((id.to_string(), PathBuf::from(path)))
        }
        _ => Err("expected ID=PATH".into()),
    }
}

/// Refuses an option given twice in one `KEY=VALUE,...` list (`what`
/// names the list in the message): the second would silently win.
fn once<'a>(what: &str, opts: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for opt in opts {
        let key = opt.split_once('=').map_or(opt, |(k, _)| k);
        if !seen.insert(key) {
            return Err(format!("{what} option {key:?} given twice"));
        }
    }
    Ok(())
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    once("vsock", s.split(','))?;
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|c| (3..=u64::from(u32::MAX - 1)).contains(c))
                        .ok_or_else(|| format!("bad vsock cid {v:?}: 3 to 4294967294"))?,
                )
            }
            Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown vsock option {opt:?} (expected cid=N,uds=PATH)"
                ))
            }
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or("a vsock device needs cid=N")?,
        uds_path: uds.ok_or("a vsock device needs uds=PATH")?,
    })
}

fn parse_net_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, tap)) if !id.is_empty() && !tap.is_empty() => {
            Ok((id.to_string(), tap.to_string()))
        }
        _ => Err("expected ID=TAP".into()),
    }
}

/// A token bucket from `SIZE/MS[+BURST]` (SIZE and BURST as `parse_bytes`
/// reads them).
fn parse_bucket(s: &str) -> Result<TokenBucketConfig, String> {
    let (rest, burst) = match s.split_once('+') {
        Some((r, b)) => (r, Some(parse_bytes(b)?)),
        None => (s, None),
    };
    let (size, ms) = rest
        .split_once('/')
        .ok_or_else(|| format!("bad limit {s:?}: expected SIZE/MS[+BURST], e.g. 10M/100"))?;
    let bucket = TokenBucketConfig {
        size: parse_bytes(size)?,
        one_time_burst: burst,
        refill_time: ms
            .parse()
            .map_err(|_| format!("bad refill time {ms:?}: milliseconds"))?,
    };
    if bucket.size == 0 || bucket.refill_time == 0 {
        return Err(format!(
            "bad limit {s:?}: size and refill time must not be 0"
        ));
    }
    Ok(bucket)
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut tap = None;
    let mut net = NetConfig::new("", "");
    let mut id = None;
    once("NIC", s.split(','))?;
    if s.split(',').any(|o| o.starts_with("tap=")) && s.split(',').any(|o| o.starts_with("fd=")) {
        return Err("a NIC takes its TAP from tap=NAME or fd=N, not both".into());
    }
    for opt in s.split(',') {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("bad NIC option {opt:?}: expected KEY=VALUE"))?;
        let limiter = |l: &mut Option<RateLimiterConfig>, bw: bool| -> Result<(), String> {
            let c = l.get_or_insert_with(RateLimiterConfig::default);
            let b = Some(parse_bucket(v)?);
            if bw {
                c.bandwidth = b;
            } else {
                c.ops = b;
            }
            Ok(())
        };
        match k {
            "tap" if !v.is_empty() => tap = Some(TapSource::Name(v.to_string())),
            "fd" => {
                let fd = v.parse().map_err(|_| format!("bad fd {v:?}"))?;
                tap = Some(TapSource::Fd(fd));
            }
            "id" if !v.is_empty() => id = Some(v.to_string()),
            "mac" => net.mac = Some(v.parse().map_err(|e| format!("{e}"))?),
            "rx-bandwidth" => limiter(&mut net.rx_rate_limiter, true)?,
            "rx-ops" => limiter(&mut net.rx_rate_limiter, false)?,
            "tx-bandwidth" => limiter(&mut net.tx_rate_limiter, true)?,
            "tx-ops" => limiter(&mut net.tx_rate_limiter, false)?,
            _ => {
                return Err(format!(
                    "unknown NIC option {opt:?} (expected tap=, fd=, id=, mac=, rx-bandwidth=, rx-ops=, tx-bandwidth=, tx-ops=)"
                ))
            }
        }
    }
    net.tap = tap.ok_or("a NIC needs tap=NAME or fd=N")?;
    net.id = id.unwrap_or_else(|| {
        format!(
            "eth{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    });
    Ok(net)
}

/// `--merge-memory BASE LAYER...`: each layer's pages into BASE, in order.
fn merge_memory(files: &[PathBuf]) -> ExitCode {
    let open = |p: &PathBuf, write: bool| {
        open_input("memory file", p, InputKind::RegularFile, write).map_err(|e| e.to_string())
    };
    let result = (|| -> Result<u64, String> {
        let base = open(&files[0], true)?;
        let mut copied = 0;
        for layer in &files[1..] {
            let l = open(layer, false)?;
            copied += vmm_kit::memory::snapshot::merge_layer(&base, &l)
                .map_err(|e| format!("{}: {e}", layer.display()))?;
        }
        Ok(copied)
    })();
    match result {
        Ok(copied) => {
            eprintln!(
                "merged {} layer(s) into {}: {copied} bytes",
                files.len() - 1,
                files[0].display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_status::VMM_ERROR)
        }
    }
}

/// Bytes from `512M`, `2G`, `1024K` or a plain number of bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (512M, 2G)"))?;
    let shift = match unit.trim() {
        "" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" | "m" => 20,
        "G" | "GiB" | "g" => 30,
        other => return Err(format!("{s}: unknown unit {other:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0)
        .ok_or(format!("{s}: not a usable size"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("not a port number (0-65535, decimal or 0x hex): {e}"))
}

/// Guest RAM in MiB from `512`, `512M`, `512MiB`, `2G`, `2GiB`.
fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number of MiB, or with a unit: 512M, 2G)"))?;
    let mib = match unit.trim() {
        "" | "M" | "MiB" | "m" => Some(n),
        "G" | "GiB" | "g" => n.checked_mul(1024),
        "T" | "TiB" | "t" => n.checked_mul(1024 * 1024),
        "K" | "KiB" | "k" if n % 1024 == 0 => Some(n / 1024),
        "K" | "KiB" | "k" => {
            return Err(format!(
                "{s}: guest RAM comes in whole MiB ({n} KiB is {:.3} MiB)",
                n as f64 / 1024.0
            ))
        }
        other => return Err(format!("{s}: unknown unit {other:?} (use M or G)")),
    };
    let mib = mib.ok_or(format!("{s} is too large"))?;
    if mib == 0 {
        return Err(format!("{s}: a guest needs some RAM"));
    }
    Ok(mib)
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("a disk needs a path")?;
    let mut disk = DiskConfig::new(path);
    once("disk", parts.clone())?;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            None if opt == "nolock" => disk.lock = false,
            Some(("id", id)) if id.len() <= 20 && id.is_ascii() => {
                disk.serial = Some(id.to_string())
            }
            Some(("id", id)) => {
                return Err(format!(
                    "disk id {id:?} is {} bytes; at most 20 ASCII characters",
                    id.len()
                ))
            }
            Some(("bandwidth", v)) => {
                disk.rate_limiter
                    .get_or_insert_with(RateLimiterConfig::default)
                    .bandwidth = Some(parse_bucket(v)?)
            }
            Some(("ops", v)) => {
                disk.rate_limiter
                    .get_or_insert_with(RateLimiterConfig::default)
                    .ops = Some(parse_bucket(v)?)
            }
            _ => {
                return Err(format!(
                    "unknown disk option {opt:?} (expected ro, nolock, id=SERIAL, bandwidth=SIZE/MS[+BURST] or ops=N/MS[+BURST])"
                ))
            }
        }
    }
    Ok(disk)
}

/// `PATH[,append]` into a path and a mode.
fn parse_output_file(spec: &str) -> Result<(PathBuf, OutputMode), String> {
    let (path, mode) = match spec.rsplit_once(',') {
        Some((p, "append")) => (p, OutputMode::Append),
        Some((p, "truncate")) => (p, OutputMode::Truncate),
        _ => (spec, OutputMode::Truncate),
    };
    if path.is_empty() {
        return Err("file= needs a path".into());
    }
    Ok((PathBuf::from(path), mode))
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s.split_once('=') {
        None if s == "stdout" => Ok(ConsoleConfig::Host),
        Some(("file", spec)) => {
            let (path, mode) = parse_output_file(spec)?;
            Ok(ConsoleConfig::File { path, mode })
        }
        _ => Err("expected stdout or file=PATH[,append]".into()),
    }
}

fn parse_serial(s: &str) -> Result<Serial, String> {
    match s.split_once('=') {
        None if s == "stdio" => Ok(Serial::Stdio),
        None if s == "pty" => Ok(Serial::Pty),
        None if s == "none" => Ok(Serial::None),
        Some(("file", spec)) => {
            let (path, mode) = parse_output_file(spec)?;
            Ok(Serial::File(path, mode))
        }
        _ => Err("expected stdio, file=PATH[,append], pty or none".into()),
    }
}

fn report(err: &dyn std::error::Error) {
    let mut msg = format!("error: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{msg}");
}

fn inspect(path: &std::path::Path) -> ExitCode {
    let result = open_input("kernel", path, InputKind::RegularFile, false)
        .map_err(|e| e.to_string())
        .and_then(|mut f| {
            inspect_kernel(&mut f).map_err(|e| {
                let mut s = format!("{}: {e}", path.display());
                if let Some(src) = std::error::Error::source(&e) {
                    s.push_str(&format!(": {src}"));
                }
                s
            })
        });
    match result {
        Ok(info) => {
            println!("{}: {info}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_status::VMM_ERROR)
        }
    }
}

/// The terminal on stdin in raw mode for as long as this lives; put back as
/// it was on every way out (return, signal stop, panic, blocked system
/// call).
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        let fd = std::io::stdin().as_raw_fd();
        let saved = get_termios(fd).ok()?;
        set_raw(fd).ok()?;
        seccomp::restore_terminal_on_sigsys(fd, saved);
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = set_termios(std::io::stdin().as_raw_fd(), &self.saved);
    }
}

/// Host input with the console's escape: Ctrl-A x stops the VM, Ctrl-A
/// Ctrl-A sends one Ctrl-A; anything else passes through.
struct Escape<R> {
    inner: R,
    events: Arc<OnceLock<VmEventSender>>,
    after_ctrl_a: bool,
}

const CTRL_A: u8 = 1;

impl<R: Read> Read for Escape<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut buf = [0u8; 64];
        loop {
            let n = self.inner.read(&mut buf[..out.len().min(64)])?;
            if n == 0 {
                return Ok(0);
            }
            let mut k = 0;
            for &b in &buf[..n] {
                if self.after_ctrl_a {
                    self.after_ctrl_a = false;
                    match b {
                        b'x' | b'X' => {
                            if let Some(events) = self.events.get() {
                                events.send(VmEvent::StopRequested(StopCause::Requested));
                            }
                            return Ok(0);
                        }
                        CTRL_A => {
                            out[k] = CTRL_A;
                            k += 1;
                        }
                        _ => {}
                    }
                } else if b == CTRL_A {
                    self.after_ctrl_a = true;
                } else if k < out.len() {
                    out[k] = b;
                    k += 1;
                }
            }
            if k > 0 {
                return Ok(k);
            }
        }
    }
}

/// The consoles' host I/O on this process's stdio, as `serial` says; with
/// `raw`, stdin goes through the escape reader, which stops the VM through
/// `events` once it is set.
fn stdio(
    console_on_stdout: bool,
    serial: &Serial,
    raw: bool,
    events: &Arc<OnceLock<VmEventSender>>,
) -> HostIo {
    let stdin: Box<dyn Read + Send> = if raw {
        Box::new(Escape {
            inner: std::io::stdin(),
            events: events.clone(),
            after_ctrl_a: false,
        })
    } else {
        Box::new(std::io::stdin())
    };
    let (serial_in, console_in) = if console_on_stdout {
        (None, Some(stdin))
    } else if *serial == Serial::Stdio {
        (Some(stdin), None)
    } else {
        (None, None)
    };
    HostIo {
        serial_out: match serial {
            Serial::None => Box::new(std::io::sink()),
            _ => Box::new(std::io::stdout()),
        },
        serial_in,
        console_out: Some(Box::new(std::io::stdout())),
        console_in,
        debugcon_out: Some(Box::new(std::io::stderr())),
    }
}

/// What the reference VMM adds to every VM it builds: the orderly stop on
/// SIGINT, SIGTERM and SIGHUP, and the escape reader's link to the VM; with
/// an API, the main thread may open disk images (`PATCH /drives` runs
/// there) and write snapshot files (`PUT /snapshot/create` too).
fn prepare(builder: &mut VmBuilder, events: &Arc<OnceLock<VmEventSender>>, api: bool) {
    let _ = events.set(builder.events());
    if let Some(path) = builder.serial_pty() {
        eprintln!("vmm: serial console on {}", path.display());
    }
    builder
        .stop_on_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        // Ending by the stopping signal needs its default action back;
        // the API socket is removed at the end.
        .allow_syscalls(
            ThreadKind::Main,
            &[libc::SYS_rt_sigaction, libc::SYS_unlink, libc::SYS_unlinkat],
        );
    if api {
        // PATCH /drives opens images; PUT /snapshot/create writes files.
        builder.allow_syscalls(
            ThreadKind::Main,
            &[
                libc::SYS_openat,
                libc::SYS_newfstatat,
                libc::SYS_fstat,
                libc::SYS_statx,
                libc::SYS_lseek,
                libc::SYS_getdents64,
                libc::SYS_pwrite64,
                libc::SYS_ftruncate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
            ],
        );
    }
}

/// Reads a Firecracker-shaped configuration file (at most 1 MiB).
fn read_config_file(path: &std::path::Path) -> Result<FullVmConfiguration, String> {
    let mut f = open_input("config file", path, InputKind::RegularFile, false)
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    (&mut f)
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() >= 1 << 20 {
        return Err(format!("{}: larger than 1 MiB", path.display()));
    }
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The files a jail shows the VMM: those its flags and config file name.
fn jail_binds(args: &Args, file: Option<&FullVmConfiguration>) -> Vec<jail::Bind> {
    let mut binds: Vec<jail::Bind> = Vec::new();
    let mut add = |p: &std::path::Path, writable: bool, output: bool| {
        let path = jail::absolute(p);
        match binds.iter_mut().find(|b| b.path == path) {
            Some(b) => b.writable |= writable,
            None => binds.push(jail::Bind {
                path,
                writable,
                output,
            }),
        }
    };
    let paths = |s: &Option<String>| s.as_deref().map(PathBuf::from);
    for p in [&args.kernel, &args.initrd, &args.config_file]
        .into_iter()
        .flatten()
    {
        add(p, false, false);
    }
    for d in &args.disk {
        add(&d.path, !d.read_only, false);
    }
    if let Serial::File(p, _) = &args.serial {
        add(p, true, true);
    }
    if let Some(ConsoleConfig::File { path, .. }) = &args.console {
        add(path, true, true);
    }
    // The vsock socket's directory: the VMM makes its socket there and
    // connects to the PATH_PORT sockets beside it.
    let vsock_paths = args
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .into_iter()
        .chain(args.restore_vsock.clone())
        .chain(file.and_then(|c| c.vsock.as_ref().map(|v| PathBuf::from(&v.uds_path))));
    for uds in vsock_paths {
        if let Some(dir) = jail::absolute(&uds).parent() {
            add(dir, true, false);
        }
    }
    if let Some(c) = file {
        if let Some(b) = &c.boot_source {
            add(std::path::Path::new(&b.kernel_image_path), false, false);
            if let Some(i) = paths(&b.initrd_path) {
                add(&i, false, false);
            }
        }
        for d in &c.drives {
            if let Some(p) = paths(&d.path_on_host) {
                add(&p, !d.is_read_only.unwrap_or(false), false);
            }
        }
        if let Some(l) = &c.logger {
            add(std::path::Path::new(&l.log_path), true, true);
        }
        if let Some(m) = &c.metrics {
            add(std::path::Path::new(&m.metrics_path), true, true);
        }
    }
    if let Some(state) = &args.restore {
        add(state, false, false);
        for m in &args.restore_memory {
            add(m, false, false);
        }
        // The snapshot's own disks, unless another image replaces them.
        if let Ok(st) = read_state_file::<SnapshotState>(state) {
            for d in &st.machine.disks {
                let replaced = args
                    .restore_disk
                    .iter()
                    .any(|(id, _)| d.id() == Some(id.as_str()));
                if !replaced {
                    add(&d.path, !d.read_only, false);
                }
            }
        }
        for (_, p) in &args.restore_disk {
            add(p, true, false);
        }
    }
    for b in &args.jail_bind {
        match b.strip_suffix(",rw") {
            Some(p) => add(std::path::Path::new(p), true, false),
            None => add(std::path::Path::new(b), false, false),
        }
    }
    binds
}

/// The API socket a stop signal removes while no VM runs yet.
static PENDING_SOCKET: OnceLock<std::ffi::CString> = OnceLock::new();

extern "C" fn remove_socket_and_end(signal: libc::c_int) {
    if let Some(path) = PENDING_SOCKET.get() {
        // SAFETY: unlink(2) on a NUL-terminated path set before the handler
        // was installed; async-signal-safe.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: restoring the default action and raising the signal again,
    // both async-signal-safe, so that the process ends by it.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Until the VM starts (and installs its own orderly stop), SIGINT, SIGTERM
/// and SIGHUP remove the API socket and end the process by the signal.
fn remove_socket_on_signals(path: Option<&std::path::Path>) {
    let Some(path) = path else { return };
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let _ = PENDING_SOCKET.set(c);
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls async-signal-safe
        // functions.
        unsafe { libc::signal(s, remove_socket_and_end as *const () as libc::sighandler_t) };
    }
}

/// The launcher's end: as the jailed VMM ended (by the signal it relayed,
/// if that is what ended it).
fn mirror(status: i32) -> ExitCode {
    if libc::WIFSIGNALED(status) {
        return die_by(libc::WTERMSIG(status));
    }
    let code = libc::WEXITSTATUS(status);
    match jail::forwarded_signal() {
        Some(s) if code == 128 + s => die_by(s),
        _ => ExitCode::from(code as u8),
    }
}

/// Ends the process by `signal`, as a program stopped by it should: its
/// parent sees the signal, not an exit status that a guest could also
/// produce.
fn die_by(signal: i32) -> ExitCode {
    // SAFETY: restoring the default action of a signal and raising it on
    // this thread; no memory is passed.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
    ExitCode::from(128u8.saturating_add(signal as u8))
}

fn main() -> ExitCode {
    // virtio-queue logs each malformed ring it meets at error level, which a
    // guest could repeat without end; our devices report the same events,
    // rate limited. RUST_LOG overrides this.
    let default_filter = "warn,virtio_queue=off";
    let fallback =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
            .build();
    let level = fallback.filter();
    // PUT /logger can redirect the log later; until then, stderr.
    let _ = ApiLogger::install(Box::new(fallback), level);
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit_status::USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Some(path) = &args.inspect_kernel {
        return inspect(path);
    }
    if !args.merge_memory.is_empty() {
        return merge_memory(&args.merge_memory);
    }
    let file_config = match args.config_file.as_deref().map(read_config_file) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit_status::VMM_ERROR);
        }
        None => None,
    };
    // The API socket is made first, on the host's side of any jail.
    let mut listener = match &args.api_sock {
        Some(path) => match ApiServer::bind(path) {
            Ok(server) => Some(server.into_listener()),
            Err(e) => {
                report(&e);
                return ExitCode::from(exit_status::VMM_ERROR);
            }
        },
        None => None,
    };
    if args.jail.is_none() {
        // In a jail, the launcher removes it.
        remove_socket_on_signals(args.api_sock.as_deref());
    }
    if let Some(id) = &args.jail {
        let keep_fd = listener.take().map(IntoRawFd::into_raw_fd);
        let spec = jail::JailSpec {
            id: id.clone(),
            uid: args.jail_uid.unwrap_or(0),
            gid: args.jail_gid.unwrap_or(0),
            base: args.jail_base.clone(),
            netns: args.jail_netns.clone(),
            cpus: args.jail_cpus,
            memory: args.jail_memory,
            io: args.jail_io.clone(),
            binds: jail_binds(&args, file_config.as_ref()),
            keep_fd,
        };
        let entered = jail::enter(&spec);
        if !matches!(entered, Ok(jail::Role::Jailed)) {
            if let Some(fd) = keep_fd {
                // SAFETY: the launcher's own copy of the listening socket,
                // not used any more.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if let Some(p) = &args.api_sock {
                let _ = std::fs::remove_file(p);
            }
        }
        match entered {
            Ok(jail::Role::Launcher(status)) => return mirror(status),
            Ok(jail::Role::Jailed) => {
                // SAFETY: the jail moved the listening socket to descriptor
                // 3 and closed every other; this takes it over.
                listener = keep_fd.map(|_| unsafe { UnixListener::from_raw_fd(3) });
            }
            Err(e) => {
                report(&e);
                return ExitCode::from(exit_status::VMM_ERROR);
            }
        }
    }
    let kernel_given = args.kernel.is_some();
    let config = VmConfig {
        mem_mib: args.mem,
        vcpus: args.vcpus,
        kernel: match args.kernel {
            Some(p) => KernelSource::Path(p),
            None => KernelSource::Bytes(vmm_kit::testguest::IMAGE),
        },
        initrd: args.initrd,
        cmdline: args.cmdline,
        protocol: match args.boot_protocol {
            Protocol::Auto => ProtocolChoice::Auto,
            Protocol::Linux64 => ProtocolChoice::Force(BootProtocol::Linux64),
            Protocol::Pvh => ProtocolChoice::Force(BootProtocol::Pvh),
        },
        ram_backing: match args.memory_backing {
            Backing::Anonymous => RamBacking::Anonymous,
            Backing::Memfd => RamBacking::Memfd,
            Backing::Hugepages => RamBacking::HugePages,
        },
        exit_port: args.exit_port,
        disks: args.disk,
        nets: args.net,
        vsock: args.vsock.clone(),
        rng: args.rng,
        console: args.console,
        serial: match &args.serial {
            Serial::File(path, mode) => SerialConfig::File {
                path: path.clone(),
                mode: *mode,
            },
            Serial::Pty => SerialConfig::Pty,
            Serial::Stdio | Serial::None => SerialConfig::Host,
        },
        debugcon: args.debugcon,
        virtio_cmdline: !args.no_virtio_cmdline,
        track_dirty_pages: args.track_dirty_pages,
        restore: args.restore.as_ref().map(|state| RestoreConfig {
            state_path: state.clone(),
            memory: args.restore_memory.clone(),
            eager: args.restore_eager,
            disks: args.restore_disk.clone(),
            nets: args.restore_net.clone(),
            vsock_uds: args.restore_vsock.clone(),
            resume: !args.restore_paused,
        }),
        // This process runs one VM: confine its main thread too.
        seccomp: if args.no_seccomp {
            SeccompPolicy::Disabled
        } else {
            SeccompPolicy::VmmThreadsAndCaller
        },
    };
    let interactive = (args.serial == Serial::Stdio || config.console == Some(ConsoleConfig::Host))
        && std::io::stdin().is_terminal();
    let console_on_stdout = config.console == Some(ConsoleConfig::Host);
    let api_mode = args.api_sock.is_some() || args.config_file.is_some();
    let mut config = config;
    if api_mode && !kernel_given {
        // The kernel comes from PUT /boot-source or the file's boot-source.
        config.kernel = KernelSource::Bytes(&[]);
    }
    let controller = VmController::new(config);
    let mut api = Api::new(controller.clone(), args.id.clone());
    if let Some(c) = file_config {
        if let Err(e) = api.apply(c) {
            let path = args
                .config_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            eprintln!("error: {}: {e}", path.display());
            if let Some(p) = &args.api_sock {
                let _ = std::fs::remove_file(p);
            }
            return ExitCode::from(exit_status::VMM_ERROR);
        }
    }
    let metrics = api.metrics();
    let socket = match (listener, &args.api_sock) {
        (Some(listener), Some(path)) => {
            let served = ApiServer::from_listener(listener, path)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
                .and_then(|s| vmm_kit::api::spawn(s, api, !args.no_seccomp).map_err(|e| e.into()));
            if let Err(e) = served {
                report(&*e);
                let _ = std::fs::remove_file(path);
                return ExitCode::from(exit_status::VMM_ERROR);
            }
            Some(path.clone())
        }
        _ => None,
    };
    let events = Arc::new(OnceLock::new());
    let io = || stdio(console_on_stdout, &args.serial, interactive, &events);
    let started = if socket.is_some() && args.config_file.is_none() && args.restore.is_none() {
        controller.serve_start(io, |b| prepare(b, &events, true))
    } else {
        controller.launch(io(), |b| prepare(b, &events, socket.is_some()))
    };
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            if let Some(p) = &socket {
                let _ = std::fs::remove_file(p);
            }
            return ExitCode::from(exit_status::VMM_ERROR);
        }
    };
    let terminal = if interactive {
        let t = RawTerminal::enter();
        if t.is_some() {
            eprint!("vmm: console in raw mode; Ctrl-A x quits\r\n");
        }
        t
    } else {
        None
    };
    let result = controller.finish(running);
    drop(terminal);
    if metrics.is_initialized() {
        if let Err(e) = metrics.flush() {
            log::warn!("{e}");
        }
    }
    if let Some(p) = &socket {
        let _ = std::fs::remove_file(p);
    }
    // Guest output was flushed by its own thread, within a bound; stdout's
    // lock may still be held by that thread if the host stalls it, so it is
    // not touched here.
    match result {
        Ok(VmExit::Stopped(StopCause::Signal(signal))) => die_by(signal),
        Ok(exit) => {
            log::info!("guest ended: {exit:?}");
            if let VmExit::GuestStatus(n) = exit {
                if n > exit_status::MAX_GUEST_STATUS {
                    log::warn!("the guest's status {n} is above 127: reported as 254");
                }
            }
            ExitCode::from(exit.exit_code())
        }
        Err(e) => {
            report(&e);
            ExitCode::from(exit_status::VMM_ERROR)
        }
    }
}
