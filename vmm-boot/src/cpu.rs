//! The boot CPU state of each protocol, as plain data, and the tables it
//! points at (GDT, identity page tables) written into guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use crate::BootError;

/// CR0 protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0 extension type (always one on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0 paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4 physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, which always reads as one.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// A segment register as the CPU caches it (KVM's `kvm_segment` in plain form).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit when set).
    pub db: bool,
    /// Code/data (set) or system (clear) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units when set).
    pub g: bool,
    /// Available for software.
    pub avl: bool,
}

impl Segment {
    /// The cached form of the GDT descriptor `entry` loaded with `selector`.
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Segment {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
        let g = (entry >> 55) & 1 == 1;
        Segment {
            base,
            limit: if g {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            present: (entry >> 47) & 1 == 1,
            dpl: ((entry >> 45) & 3) as u8,
            db: (entry >> 54) & 1 == 1,
            s: (entry >> 44) & 1 == 1,
            l: (entry >> 53) & 1 == 1,
            g,
            avl: (entry >> 52) & 1 == 1,
        }
    }
}

/// Builds a GDT descriptor from its flags (bits 8-15: access byte, bits
/// 12-15 of the high word: G, D/B, L, AVL, packed as in the Linux
/// `GDT_ENTRY` macro), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// A descriptor table register (GDTR or IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// The state the boot vCPU starts in: general registers, segments, tables and
/// control registers, independent of any hypervisor API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootCpuState {
    /// Instruction pointer: the kernel entry.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer.
    pub rbp: u64,
    /// `rsi`: the zero page (Linux 64-bit protocol).
    pub rsi: u64,
    /// `rbx`: the `hvm_start_info` (PVH).
    pub rbx: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// Code segment.
    pub cs: Segment,
    /// Data segments.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR.
    pub gdt: DescriptorTable,
    /// IDTR.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// The Linux 64-bit GDT: `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18, a TSS at 0x20.
pub const LINUX64_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
];

/// The PVH GDT: 32-bit flat code at 0x08, data at 0x10, a TSS at 0x18.
pub const PVH_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // 0x08: 32-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x10: data
    gdt_entry(0x008b, 0, 0x67),    // 0x18: TSS
];

fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<DescriptorTable, BootError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::BootStructuresDoNotFit)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::BootStructuresDoNotFit)?;
    Ok(DescriptorTable {
        base: BOOT_GDT_START,
        limit: (gdt.len() * 8 - 1) as u16,
    })
}

/// Writes identity page tables for the first 1 GiB (2 MiB pages) and returns
/// the PML4 address.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64, BootError> {
    let err = |_| BootError::BootStructuresDoNotFit;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(err)?;
    let mut pd = [0u8; 4096];
    for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        entry.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(err)?;
    Ok(PML4_START)
}

/// The Linux 64-bit boot protocol state: long mode, paging on over an identity
/// map of the first 1 GiB, `__BOOT_CS`/`__BOOT_DS`, `rsi` = zero page.
/// Writes the GDT and page tables it refers to.
pub fn linux64_cpu_state<M: GuestMemoryBackend>(
    mem: &M,
    entry: u64,
    zero_page: u64,
) -> Result<BootCpuState, BootError> {
    let gdt = write_gdt(mem, &LINUX64_GDT)?;
    let cr3 = write_identity_page_tables(mem)?;
    let code = Segment::from_gdt_entry(0x10, LINUX64_GDT[2]);
    let data = Segment::from_gdt_entry(0x18, LINUX64_GDT[3]);
    Ok(BootCpuState {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        rbx: 0,
        rflags: RFLAGS_RESERVED,
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::from_gdt_entry(0x20, LINUX64_GDT[4]),
        gdt,
        idt: DescriptorTable {
            base: BOOT_IDT_START,
            limit: 7,
        },
        cr0: CR0_PE | CR0_ET | CR0_PG,
        cr3,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
    })
}

/// The PVH boot state: 32-bit protected mode, paging off, flat 4 GiB code and
/// data segments, `ebx` = `hvm_start_info`. Writes the GDT it refers to.
pub fn pvh_cpu_state<M: GuestMemoryBackend>(
    mem: &M,
    entry: u64,
    start_info: u64,
) -> Result<BootCpuState, BootError> {
    let gdt = write_gdt(mem, &PVH_GDT)?;
    let code = Segment::from_gdt_entry(0x08, PVH_GDT[1]);
    let data = Segment::from_gdt_entry(0x10, PVH_GDT[2]);
    Ok(BootCpuState {
        rip: entry,
        rsp: 0,
        rbp: 0,
        rsi: 0,
        rbx: start_info,
        rflags: RFLAGS_RESERVED,
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::from_gdt_entry(0x18, PVH_GDT[3]),
        gdt,
        idt: DescriptorTable {
            base: BOOT_IDT_START,
            limit: 7,
        },
        cr0: CR0_PE | CR0_ET,
        cr3: 0,
        cr4: 0,
        efer: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_match_the_values_linux_and_its_vmms_use() {
        // Values of the flat 4 GiB descriptors as the Linux boot protocol
        // documentation describes them (and as arch/x86 GDT_ENTRY builds them).
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let cs = Segment::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(
            cs,
            Segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x10,
                type_: 0xb,
                present: true,
                dpl: 0,
                db: false,
                s: true,
                l: true,
                g: true,
                avl: false,
            }
        );
        let odd = Segment::from_gdt_entry(0x8, gdt_entry(0x0093, 0x1234_5678, 0xabcde));
        assert_eq!(
            (odd.base, odd.limit, odd.g, odd.db),
            (0x1234_5678, 0xabcde, false, false)
        );
    }

    #[test]
    fn linux64_state_is_long_mode_with_boot_selectors_and_identity_map() {
        let m = mem();
        let s = linux64_cpu_state(&m, 0x100_0000, 0x7000).unwrap();
        assert_eq!((s.rip, s.rsi, s.rflags), (0x100_0000, 0x7000, 2));
        assert_eq!(s.cs.selector, 0x10);
        assert!(s.cs.l && !s.cs.db);
        for seg in [s.ds, s.es, s.ss] {
            assert_eq!(seg.selector, 0x18);
        }
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        // The GDT in memory holds the descriptors the segments came from.
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(s.gdt.base + 0x10)).unwrap(),
            LINUX64_GDT[2]
        );
        // Page walk: PML4[0] -> PDPT[0] -> PD[i] maps 2 MiB page i to itself.
        let pml4e: u64 = m.read_obj(GuestAddress(s.cr3)).unwrap();
        let pdpte: u64 = m.read_obj(GuestAddress(pml4e & !0xfff)).unwrap();
        let pd = pdpte & !0xfff;
        for i in [0u64, 1, 8, 511] {
            let pde: u64 = m.read_obj(GuestAddress(pd + 8 * i)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
    }

    #[test]
    fn pvh_state_is_flat_32bit_protected_mode_without_paging() {
        let m = mem();
        let s = pvh_cpu_state(&m, 0x10_0000, 0x6000).unwrap();
        assert_eq!((s.rip, s.rbx), (0x10_0000, 0x6000));
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert!(s.cs.db && !s.cs.l);
        assert_eq!((s.cs.base, s.cs.limit), (0, 0xffff_ffff));
        assert_eq!((s.ds.base, s.ds.limit, s.ds.type_), (0, 0xffff_ffff, 3));
        assert_eq!((s.tr.limit, s.tr.type_), (0x67, 0xb));
        assert_eq!(
            s.rflags & ((1 << 17) | (1 << 9) | (1 << 8)),
            0,
            "VM, IF, TF clear"
        );
    }

    #[test]
    fn tables_that_do_not_fit_memory_are_an_error() {
        let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            linux64_cpu_state(&tiny, 0, 0),
            Err(BootError::BootStructuresDoNotFit)
        ));
    }
}
