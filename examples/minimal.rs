//! The reference VMM: a thin command line over the crate family.
//!
//! `cargo run --example minimal` boots the embedded test guest, prints its
//! serial output and exits with the guest's status. See `--help`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use vmm_kit::boot::{inspect_kernel, BootProtocol, ProtocolChoice};
use vmm_kit::core::{
    ConsoleConfig, DiskConfig, HostIo, KernelSource, SeccompPolicy, VmBuilder, VmConfig, VmmError,
    DEFAULT_CMDLINE,
};
use vmm_kit::devices::legacy::DEBUG_EXIT_PORT;
use vmm_kit::memory::RamBacking;

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

/// A minimal VMM on KVM: boots a kernel (or the embedded test guest) with a
/// serial console and exits with the guest's status.
#[derive(Debug, Parser)]
#[command(version)]
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
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs (only 1 is supported for now).
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
    /// A virtio-blk disk on a raw image: PATH[,ro][,id=SERIAL]. Repeatable.
    #[arg(long, value_name = "PATH[,ro][,id=SERIAL]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio-console: `stdout` (output to stdout, input from stdin) or
    /// `file=PATH` (output to PATH).
    #[arg(long, value_name = "stdout|file=PATH", value_parser = parse_console)]
    console: Option<ConsoleConfig>,
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
}

fn parse_port(s: &str) -> Result<u16, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("not a port number (0-65535, decimal or 0x hex): {e}"))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("a disk needs a path")?;
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("id", id)) if id.len() <= 20 && id.is_ascii() => {
                disk.serial = Some(id.to_string())
            }
            Some(("id", _)) => return Err("a disk id is at most 20 ASCII characters".into()),
            _ => {
                return Err(format!(
                    "unknown disk option {opt:?} (expected ro or id=SERIAL)"
                ))
            }
        }
    }
    Ok(disk)
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s.split_once('=') {
        None if s == "stdout" => Ok(ConsoleConfig::Host),
        Some(("file", path)) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
        _ => Err("expected stdout or file=PATH".into()),
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

fn inspect(path: &PathBuf) -> ExitCode {
    let result = File::open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
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
            ExitCode::FAILURE
        }
    }
}

/// The VM `config` describes, its consoles on this process's stdio: COM1
/// on stdout, stdin to the virtio console when it is on stdout (else to
/// COM1), the debug console on stderr. Ctrl-C stops it.
fn build(config: &VmConfig) -> Result<vmm_kit::core::Vmm, VmmError> {
    let console_on_stdout = config.console == Some(ConsoleConfig::Host);
    let stdin = || Some(Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>);
    let io = HostIo {
        serial_out: Box::new(std::io::stdout()),
        serial_in: if console_on_stdout { None } else { stdin() },
        console_out: Some(Box::new(std::io::stdout())),
        console_in: if console_on_stdout { stdin() } else { None },
        debugcon_out: Some(Box::new(std::io::stderr())),
    };
    let mut builder = VmBuilder::from_config(config, io)?;
    builder.stop_on_signals(&[libc::SIGINT]);
    builder.build()
}

fn main() -> ExitCode {
    // virtio-queue logs each malformed ring it meets at error level, which a
    // guest could repeat without end; our devices report the same events,
    // rate limited. RUST_LOG overrides this.
    let default_filter = "warn,virtio_queue=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .init();
    let args = Args::parse();
    if let Some(path) = &args.inspect_kernel {
        return inspect(path);
    }
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
        rng: args.rng,
        console: args.console,
        // This process runs one VM: confine its main thread too.
        debugcon: args.debugcon,
        seccomp: if args.no_seccomp {
            SeccompPolicy::Disabled
        } else {
            SeccompPolicy::VmmThreadsAndCaller
        },
    };
    let vmm = match build(&config) {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return ExitCode::FAILURE;
        }
    };
    match vmm.run() {
        Ok(exit) => {
            let _ = std::io::stdout().flush();
            log::info!("guest ended: {exit:?}");
            ExitCode::from(exit.exit_code())
        }
        Err(e) => {
            let _ = std::io::stdout().flush();
            report(&e);
            ExitCode::FAILURE
        }
    }
}
