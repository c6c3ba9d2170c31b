//! Boot parameters: the e820 map, the Linux zero page and the PVH start info.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_memory::{AddressMap, GuestRange};

use crate::layout::{
    CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};
use crate::BootError;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Most e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest memory map of `map`: RAM below the EBDA, the EBDA and BIOS area
/// reserved, RAM from 1 MiB to the gap, RAM above 4 GiB.
pub fn e820_map(map: &AddressMap) -> Vec<E820Entry> {
    let mut out = Vec::new();
    for r in map.ram() {
        let (start, end) = (r.start(), r.end());
        if start < HIMEM_START {
            out.push(E820Entry {
                addr: start,
                size: EBDA_START.min(end) - start,
                kind: E820_RAM,
            });
            out.push(E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            if end > HIMEM_START {
                out.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            out.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    out
}

/// What goes into the zero page besides the memory map.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxParams {
    /// The bzImage setup header, if the kernel is one.
    pub setup_header: Option<setup_header>,
    /// Address and length (with its NUL) of the command line.
    pub cmdline: (u64, usize),
    /// Where the initrd is.
    pub initrd: Option<GuestRange>,
    /// Where the ACPI RSDP is.
    pub acpi_rsdp: Option<u64>,
}

/// Writes the Linux zero page at [`ZERO_PAGE_START`] and returns its address.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    map: &AddressMap,
    p: &LinuxParams,
) -> Result<u64, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = p.setup_header {
        params.hdr = hdr;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    if p.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    let (cmd_addr, cmd_len) = p.cmdline;
    params.hdr.cmd_line_ptr = cmd_addr as u32;
    params.ext_cmd_line_ptr = (cmd_addr >> 32) as u32;
    params.hdr.cmdline_size = cmd_len.min(CMDLINE_MAX_SIZE) as u32;
    if let Some(r) = p.initrd {
        let (addr, size) = (r.start(), r.len());
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = p.acpi_rsdp.unwrap_or(0);
    let e820 = e820_map(map);
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<M>(&bp, mem).map_err(BootError::Configure)?;
    Ok(ZERO_PAGE_START)
}

/// Writes the PVH `hvm_start_info`, its memory map and module list, and
/// returns the start info address.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    map: &AddressMap,
    cmdline_addr: u64,
    initrd: Option<GuestRange>,
    acpi_rsdp: Option<u64>,
) -> Result<u64, BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(map)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: acpi_rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(r) = initrd {
        let (paddr, size) = (r.start(), r.len());
        modules.push(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    bp.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&bp, mem).map_err(BootError::Configure)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use vmm_memory::layout::{HIGH_RAM_START, MMIO_GAP_START};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn e820_reserves_the_ebda_and_bios_area() {
        let map = AddressMap::new(128 << 20).unwrap();
        assert_eq!(
            e820_map(&map),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_includes_ram_above_4g() {
        let map = AddressMap::new(MMIO_GAP_START + (1 << 30)).unwrap();
        let e = e820_map(&map);
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[3],
            E820Entry {
                addr: HIGH_RAM_START,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = e
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, map.ram_size() - 0x60400);
    }

    #[test]
    fn zero_page_fields_sit_at_the_offsets_of_the_boot_protocol() {
        let m = mem();
        let map = AddressMap::new(16 << 20).unwrap();
        let p = LinuxParams {
            setup_header: None,
            cmdline: (0x20000, 12),
            initrd: GuestRange::new(0x80_0000, 0x1234),
            acpi_rsdp: Some(0xe_0000),
        };
        let zp = write_zero_page(&m, &map, &p).unwrap();
        let at = |off: u64| GuestAddress(zp + off);
        // Offsets from Documentation/arch/x86/boot.rst and zero-page.rst.
        assert_eq!(m.read_obj::<u16>(at(0x1fe)).unwrap(), 0xaa55);
        assert_eq!(m.read_obj::<u32>(at(0x202)).unwrap(), 0x5372_6448);
        assert_eq!(m.read_obj::<u8>(at(0x210)).unwrap(), 0xff);
        assert_eq!(m.read_obj::<u32>(at(0x218)).unwrap(), 0x80_0000);
        assert_eq!(m.read_obj::<u32>(at(0x21c)).unwrap(), 0x1234);
        assert_eq!(m.read_obj::<u32>(at(0x228)).unwrap(), 0x20000);
        assert_eq!(m.read_obj::<u32>(at(0x238)).unwrap(), 12);
        assert_eq!(m.read_obj::<u8>(at(0x1e8)).unwrap(), 3);
        assert_eq!(
            m.read_obj::<u64>(at(0x070)).unwrap(),
            0xe_0000,
            "acpi_rsdp_addr"
        );
        assert_eq!(m.read_obj::<u64>(at(0x2d0 + 20 * 2)).unwrap(), 0x10_0000);
        assert_eq!(
            m.read_obj::<u32>(at(0x2d0 + 20 + 16)).unwrap(),
            E820_RESERVED
        );
    }

    #[test]
    fn pvh_start_info_has_magic_cmdline_memmap_and_module() {
        let m = mem();
        let map = AddressMap::new(16 << 20).unwrap();
        let si = write_pvh_start_info(
            &m,
            &map,
            0x20000,
            GuestRange::new(0x80_0000, 0x1000),
            Some(0xe_0000),
        )
        .unwrap();
        let at = |off: u64| GuestAddress(si + off);
        assert_eq!(m.read_obj::<u32>(at(0)).unwrap(), 0x336e_c578);
        assert_eq!(m.read_obj::<u32>(at(4)).unwrap(), 1);
        assert_eq!(m.read_obj::<u32>(at(12)).unwrap(), 1, "nr_modules");
        assert_eq!(m.read_obj::<u64>(at(24)).unwrap(), 0x20000, "cmdline_paddr");
        assert_eq!(m.read_obj::<u64>(at(32)).unwrap(), 0xe_0000, "rsdp_paddr");
        let memmap = m.read_obj::<u64>(at(40)).unwrap();
        assert_eq!(m.read_obj::<u32>(at(48)).unwrap(), 3, "memmap_entries");
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(memmap + 24 * 2)).unwrap(),
            0x10_0000
        );
        let modlist = m.read_obj::<u64>(at(16)).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(modlist)).unwrap(), 0x80_0000);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(modlist + 8)).unwrap(),
            0x1000
        );
    }
}
