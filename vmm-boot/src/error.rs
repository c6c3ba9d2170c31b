//! Why a guest could not be set up for boot.

use std::io;

use crate::image::{BootProtocol, ImageError, KernelFormat};

/// Why a guest could not be set up for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image is not one this crate can boot.
    #[error("bad kernel image")]
    Image(#[from] ImageError),
    /// Reading the kernel image failed.
    #[error("cannot read the kernel image")]
    KernelRead(#[source] io::Error),
    /// The image does not support the protocol asked for.
    #[error("the {format} kernel image does not support the {protocol} boot protocol")]
    ProtocolUnsupported {
        /// Protocol asked for.
        protocol: BootProtocol,
        /// Format of the image.
        format: KernelFormat,
    },
    /// The kernel would load outside RAM (or below 1 MiB).
    #[error(
        "the kernel loads at {start:#x}..{end:#x}, which is not inside guest RAM \
         (low RAM ends at {ram_end:#x}; give the guest more memory)"
    )]
    KernelDoesNotFit {
        /// First address of the kernel.
        start: u64,
        /// End of the kernel.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line has a character the kernel would not accept.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; at most {max} are accepted")]
    CmdlineTooLong {
        /// Its length with the NUL.
        len: usize,
        /// The limit with the NUL.
        max: usize,
    },
    /// Reading the initrd failed.
    #[error("cannot read the initrd")]
    InitrdRead(#[source] io::Error),
    /// The command line has a character the kernel's command line cannot
    /// hold (only printable ASCII and spaces).
    #[error(
        "the kernel command line has {character:?} at position {position} (counting from 0); \
         only printable ASCII characters and spaces are allowed"
    )]
    CmdlineCharacter {
        /// The character.
        character: char,
        /// Its position, in characters.
        position: usize,
    },
    /// The initrd file is empty.
    #[error("the initrd is empty")]
    InitrdEmpty,
    /// The initrd has no room in low RAM above the kernel.
    #[error(
        "the initrd of {} does not fit: {} of low RAM are free above the kernel (give the guest more memory)",
        vmm_memory::Size(*size),
        vmm_memory::Size(*room)
    )]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// Room available.
        room: u64,
    },
    /// The vCPU count is zero or more than the tables can describe.
    #[error("{0} vCPUs cannot be described: between 1 and 254 are supported (xAPIC IDs)")]
    TooManyVcpus(u8),
    /// Low memory is too small for the boot tables.
    #[error("guest memory is too small for the boot structures")]
    BootStructuresDoNotFit,
    /// The memory map is too long for the zero page.
    #[error("the memory map has {0} entries; the zero page holds 128")]
    TooManyE820Entries(usize),
    /// linux-loader could not write the boot parameters.
    #[error("cannot write the boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    /// A guest memory access failed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}
