//! What a VM is made of, as plain data ([`VmConfig`]: what a command line, a
//! config file or an API fills in), and the host I/O its consoles use
//! ([`HostIo`]), which the caller injects.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use vmm_boot::ProtocolChoice;
use vmm_devices::host_files::OutputMode;
use vmm_devices::legacy::DEBUG_EXIT_PORT;
use vmm_memory::RamBacking;

use crate::devices::{ConsoleConfig, DiskConfig, NetConfig, VsockConfig};
use crate::seccomp::SeccompPolicy;

/// Default kernel command line: what a Linux guest needs on this machine
/// model (serial console, reset through the i8042, reboot on panic).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// An image file.
    Path(PathBuf),
    /// An image in memory (such as the embedded test guest).
    Bytes(&'static [u8]),
}

/// What to build: a plain description, applied through
/// [`VmBuilder::from_config`](crate::VmBuilder::from_config).
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs (1-254).
    pub vcpus: u8,
    /// The kernel.
    pub kernel: KernelSource,
    /// An initrd file.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// The boot protocol.
    pub protocol: ProtocolChoice,
    /// What backs guest RAM.
    pub ram_backing: RamBacking,
    /// The debug-exit port.
    pub exit_port: u16,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs (after the disks).
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device (after the NICs).
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-console.
    pub console: Option<ConsoleConfig>,
    /// Where COM1 goes.
    pub serial: SerialConfig,
    /// Which threads get seccomp filters.
    pub seccomp: SeccompPolicy,
    /// Put a debug console (port 0xE9) on the bus, writing to
    /// [`HostIo::debugcon_out`].
    pub debugcon: bool,
    /// Announce the virtio-mmio devices on the command line too
    /// (`virtio_mmio.device=`); the DSDT describes them either way.
    pub virtio_cmdline: bool,
    /// Track the pages the guest and the devices write (KVM's dirty log
    /// and vm-memory's bitmaps), so that diff snapshots can be taken.
    pub track_dirty_pages: bool,
    /// Restore this snapshot instead of booting: the machine (RAM, vCPUs,
    /// devices, command line) is the snapshot's, and the fields above that
    /// describe it are ignored; the host's side (serial and console
    /// outputs, seccomp, RAM backing of an eager restore, dirty page
    /// tracking) still comes from here.
    pub restore: Option<crate::snapshot::RestoreConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            vcpus: 1,
            kernel: KernelSource::Bytes(&[]),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            protocol: ProtocolChoice::Auto,
            ram_backing: RamBacking::Anonymous,
            exit_port: DEBUG_EXIT_PORT,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: false,
            console: None,
            serial: SerialConfig::Host,
            seccomp: SeccompPolicy::default(),
            debugcon: false,
            virtio_cmdline: true,
            track_dirty_pages: false,
            restore: None,
        }
    }
}

/// Where COM1 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialConfig {
    /// The host I/O given to the builder ([`HostIo::serial_out`] and
    /// [`HostIo::serial_in`]).
    #[default]
    Host,
    /// Output to a file, no input.
    File {
        /// The file (created if missing; refused if it is one of the VM's
        /// inputs).
        path: PathBuf,
        /// Emptied first, or appended to.
        mode: OutputMode,
    },
    /// A new pseudo-terminal, in raw mode (its path:
    /// [`Vmm::serial_pty`](crate::Vmm::serial_pty)).
    Pty,
}

/// The host's side of a VM's consoles. The library never reaches for the
/// process's stdin, stdout or stderr: whoever builds the VM says where each
/// console goes. By default output is discarded and there is no input.
///
/// ```
/// use vmm_core::HostIo;
///
/// // The reference VMM's choice: COM1 on stdout and stdin.
/// let io = HostIo {
///     serial_out: Box::new(std::io::stdout()),
///     serial_in: Some(Box::new(std::io::stdin())),
///     ..HostIo::default()
/// };
/// # drop(io);
/// ```
pub struct HostIo {
    /// What the guest writes to COM1.
    pub serial_out: Box<dyn Write + Send>,
    /// What the guest reads from COM1 (read on a thread of its own once
    /// the VM starts).
    pub serial_in: Option<Box<dyn Read + Send>>,
    /// Output of a virtio console configured as [`ConsoleConfig::Host`].
    pub console_out: Option<Box<dyn Write + Send>>,
    /// Input of that console (read on a thread of its own once the VM
    /// starts).
    pub console_in: Option<Box<dyn Read + Send>>,
    /// Output of the debug console (port 0xE9).
    pub debugcon_out: Option<Box<dyn Write + Send>>,
}

impl Default for HostIo {
    fn default() -> Self {
        Self {
            serial_out: Box::new(io::sink()),
            serial_in: None,
            console_out: None,
            console_in: None,
            debugcon_out: None,
        }
    }
}

impl HostIo {
    /// COM1 output to `out`, nothing else.
    pub fn serial(out: Box<dyn Write + Send>) -> Self {
        Self {
            serial_out: out,
            ..Self::default()
        }
    }
}
