//! What the VMM told the guest: boot protocol, command line and memory map,
//! read from the Linux zero page or the PVH `hvm_start_info`.

use crate::boot::{PROTO_LINUX64, PROTO_PVH};

/// Longest command line the guest reads.
const CMDLINE_MAX: usize = 4096;
/// Most memory map entries the guest reads (the zero page holds 128).
const MEMMAP_MAX: usize = 128;

const E820_RAM: u32 = 1;
const PVH_MAGIC: u32 = 0x336e_c578;

/// Boot information, independent of the protocol it came by.
pub struct BootInfo {
    /// `"linux64"` or `"pvh"`.
    pub protocol: &'static str,
    /// The kernel command line (may be empty).
    pub cmdline: &'static [u8],
    /// Sum of the RAM entries of the memory map, in bytes.
    pub ram_bytes: u64,
    /// End of the highest RAM entry.
    pub ram_top: u64,
    /// Number of memory map entries.
    pub map_entries: u32,
    /// Where the ACPI RSDP is, if the VMM said (0 otherwise).
    pub rsdp: u64,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the first 4 GiB are identity mapped and user readable; the
    // addresses come from the boot structures the VMM wrote.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn cstr_at(addr: u64, max: usize) -> &'static [u8] {
    if addr == 0 || addr >= 1 << 32 {
        return &[];
    }
    let mut len = 0;
    while len < max && read::<u8>(addr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `addr` were just read; guest memory lives as
    // long as the guest.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

impl BootInfo {
    /// Reads the boot information left by the entry protocol `proto`.
    pub fn read(proto: u32, info: u64) -> Result<BootInfo, &'static str> {
        match proto {
            PROTO_LINUX64 => Ok(Self::from_zero_page(info)),
            PROTO_PVH => Self::from_pvh(info),
            _ => Err("unknown entry protocol"),
        }
    }

    fn from_zero_page(zp: u64) -> BootInfo {
        let cmd_ptr = read::<u32>(zp + 0x228) as u64 | ((read::<u32>(zp + 0x0c8) as u64) << 32);
        let cmd_size = read::<u32>(zp + 0x238) as usize;
        let max = if cmd_size == 0 { CMDLINE_MAX } else { cmd_size.min(CMDLINE_MAX) };
        let entries = (read::<u8>(zp + 0x1e8) as usize).min(MEMMAP_MAX);
        let mut info = BootInfo {
            protocol: "linux64",
            cmdline: cstr_at(cmd_ptr, max),
            ram_bytes: 0,
            ram_top: 0,
            map_entries: entries as u32,
            rsdp: read::<u64>(zp + 0x070),
        };
        for i in 0..entries {
            let e = zp + 0x2d0 + 20 * i as u64;
            info.add_region(read::<u64>(e), read::<u64>(e + 8), read::<u32>(e + 16));
        }
        info
    }

    fn from_pvh(si: u64) -> Result<BootInfo, &'static str> {
        if read::<u32>(si) != PVH_MAGIC {
            return Err("bad hvm_start_info magic");
        }
        let entries = (read::<u32>(si + 48) as usize).min(MEMMAP_MAX);
        let map = read::<u64>(si + 40);
        let mut info = BootInfo {
            protocol: "pvh",
            cmdline: cstr_at(read::<u64>(si + 24), CMDLINE_MAX),
            ram_bytes: 0,
            ram_top: 0,
            map_entries: entries as u32,
            rsdp: read::<u64>(si + 32),
        };
        if map != 0 {
            for i in 0..entries {
                let e = map + 24 * i as u64;
                info.add_region(read::<u64>(e), read::<u64>(e + 8), read::<u32>(e + 16));
            }
        }
        Ok(info)
    }

    fn add_region(&mut self, addr: u64, size: u64, kind: u32) {
        if kind == E820_RAM {
            self.ram_bytes = self.ram_bytes.saturating_add(size);
            self.ram_top = self.ram_top.max(addr.saturating_add(size));
        }
    }
}
