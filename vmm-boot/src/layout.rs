//! Where the boot structures go in low guest memory (all below 1 MiB, under
//! the kernel's load address).

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty: interrupts stay off until the kernel sets its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the 64-bit protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables of the 64-bit protocol: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// See [`PML4_START`].
pub const PDPTE_START: u64 = 0xa000;
/// See [`PML4_START`].
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA: low RAM reported to the guest ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory (1 MiB): kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest address an initrd may end at unless the kernel says otherwise.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
