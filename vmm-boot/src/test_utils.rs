//! Tiny kernel images for tests, fuzz targets and examples (the
//! `test-utils` feature): an x86_64 ELF with one segment (and a PVH note if
//! asked), and a bzImage with a valid setup header.
//!
//! ```
//! use std::io::Cursor;
//! use vmm_boot::test_utils::tiny_elf;
//! use vmm_boot::{inspect_kernel, BootProtocol};
//!
//! let elf = tiny_elf(0x10_0000, &[0xf4], 16, Some(0x10_0000));
//! let info = inspect_kernel(&mut Cursor::new(elf))?;
//! assert!(info.supports(BootProtocol::Pvh));
//! # Ok::<(), vmm_boot::ImageError>(())
//! ```

use crate::image::{
    BZ_HEADER_MAGIC, BZ_LOADED_HIGH, ELFCLASS64, ELFDATA2LSB, ELF_MAGIC, EM_X86_64, ET_EXEC,
    PT_LOAD, PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY,
};

/// A minimal x86_64 ELF executable: one PT_LOAD of `code` at `paddr`, and
/// a PVH note when `pvh` is given.
pub fn tiny_elf(paddr: u64, code: &[u8], memsz: u64, pvh: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh.is_some() { 2 } else { 1 };
    let note: Vec<u8> = match pvh {
        Some(entry) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let code_off = 64 + 56 * u64::from(phnum);
    let note_off = code_off + code.len() as u64;
    let mut f = Vec::new();
    f.extend_from_slice(&ELF_MAGIC);
    f.extend_from_slice(&[ELFCLASS64, ELFDATA2LSB, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&ET_EXEC.to_le_bytes());
    f.extend_from_slice(&EM_X86_64.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&paddr.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&[0; 6]);
    let mut phdr = |kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        for v in [off, addr, addr, filesz, memsz, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(PT_LOAD, code_off, paddr, code.len() as u64, memsz);
    if pvh.is_some() {
        phdr(PT_NOTE, note_off, 0, note.len() as u64, note.len() as u64);
    }
    f.extend_from_slice(code);
    f.extend_from_slice(&note);
    f
}

/// A minimal bzImage: a setup header (boot protocol `version`) and a payload.
pub fn tiny_bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(&BZ_HEADER_MAGIC.to_le_bytes());
    f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    f[0x1f4..0x1f8].copy_from_slice(&(payload.len().div_ceil(16) as u32).to_le_bytes());
    f[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
    f[0x211] = BZ_LOADED_HIGH;
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    f[0x500..0x510].copy_from_slice(b"6.1.0-test (ci)\0");
    f.extend_from_slice(payload);
    f
}
