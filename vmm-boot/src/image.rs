//! Kernel image inspection: what an image is and which boot protocols it can
//! enter by, read from its headers without touching guest memory.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;
use vmm_memory::GuestRange;

/// How a guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BootProtocol {
    /// The 64-bit Linux boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64,
    /// The Xen PVH protocol: 32-bit protected mode, paging off,
    /// `ebx` = `hvm_start_info`.
    Pvh,
}

impl fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootProtocol::Linux64 => "linux64",
            BootProtocol::Pvh => "pvh",
        })
    }
}

/// The container format of a kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An x86_64 ELF executable (`vmlinux` or a PVH-capable ELF).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

impl fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

/// What [`inspect_kernel`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// Container format.
    pub format: KernelFormat,
    /// The protocols the image can be booted by, preferred first.
    pub protocols: Vec<BootProtocol>,
    /// The 64-bit entry point (ELF `e_entry`; for a bzImage, relative to the
    /// load address: 0x200).
    pub entry64: Option<u64>,
    /// The PVH 32-bit entry point, from the Xen ELF note.
    pub pvh_entry: Option<u64>,
    /// The guest physical addresses the image occupies (ELF: from the
    /// lowest to the end of the highest PT_LOAD segment; bzImage: its
    /// preferred address and `init_size`).
    pub load_range: Option<GuestRange>,
    /// Linux boot protocol version of a bzImage (`0x020f` is 2.15).
    pub boot_protocol_version: Option<u16>,
    /// The kernel version string embedded in a bzImage.
    pub kernel_version: Option<String>,
}

impl KernelInfo {
    /// Whether the image supports `protocol`.
    pub fn supports(&self, protocol: BootProtocol) -> bool {
        self.protocols.contains(&protocol)
    }
}

impl fmt::Display for KernelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "format: {}", self.format)?;
        if let Some(v) = &self.kernel_version {
            write!(f, "\nkernel version: {v}")?;
        }
        if let Some(v) = self.boot_protocol_version {
            write!(f, "\nboot protocol version: {}.{:02}", v >> 8, v & 0xff)?;
        }
        let protocols: Vec<String> = self.protocols.iter().map(ToString::to_string).collect();
        write!(f, "\nprotocols: {}", protocols.join(", "))?;
        if let Some(e) = self.entry64 {
            write!(f, "\n64-bit entry: {e:#x}")?;
        }
        if let Some(e) = self.pvh_entry {
            write!(f, "\nPVH entry: {e:#x}")?;
        }
        if let Some(r) = self.load_range {
            write!(f, "\nloads at: {:#x}..{:#x}", r.start(), r.end())?;
        }
        Ok(())
    }
}

/// Why an image could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the image failed.
    #[error("cannot read the kernel image")]
    Io(#[from] io::Error),
    /// Neither an ELF nor a bzImage.
    #[error("not a kernel image: neither an ELF executable nor a bzImage (found {found})")]
    UnknownFormat {
        /// What the first bytes look like.
        found: String,
    },
    /// An ELF this VMM cannot boot.
    #[error("unsupported ELF image: {0}")]
    UnsupportedElf(&'static str),
    /// A bzImage this VMM cannot boot.
    #[error("unsupported bzImage: {0}")]
    UnsupportedBzImage(&'static str),
    /// A bzImage shorter than its header says.
    #[error(
        "truncated bzImage: its header says the kernel is {expected} bytes, the file holds {found}"
    )]
    TruncatedBzImage {
        /// Bytes the header announces (`syssize`).
        expected: u64,
        /// Bytes after the setup sectors.
        found: u64,
    },
}

pub(crate) const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
pub(crate) const ELFCLASS64: u8 = 2;
pub(crate) const ELFDATA2LSB: u8 = 1;
pub(crate) const EM_X86_64: u16 = 62;
pub(crate) const ET_EXEC: u16 = 2;
pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const PT_NOTE: u32 = 4;
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers read from an ELF.
const MAX_PHDRS: u16 = 256;
/// Largest note segment read from an ELF.
const MAX_NOTE_SEGMENT: u64 = 64 * 1024;

pub(crate) const BZ_HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
pub(crate) const BZ_LOADED_HIGH: u8 = 0x01;
const BZ_XLF_KERNEL_64: u16 = 0x01;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One PT_LOAD segment of an ELF image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ElfSegment {
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Guest physical address.
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
}

/// What there is to load, as the headers say: the one description the
/// loader works from.
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    /// The PT_LOAD segments of an ELF.
    Elf(Vec<ElfSegment>),
    /// The protected-mode kernel of a bzImage, after its setup sectors.
    BzImage {
        /// The setup header, as read from offset 0x1f1.
        header: setup_header,
        /// Where the kernel starts in the file.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

/// Reads the image's headers and says what it is.
///
/// ```
/// use std::io::Cursor;
/// use vmm_boot::{inspect_kernel, BootProtocol, KernelFormat};
///
/// let info = inspect_kernel(&mut Cursor::new(vmm_testguest::IMAGE))?;
/// assert_eq!(info.format, KernelFormat::Elf);
/// assert!(info.supports(BootProtocol::Pvh) && info.supports(BootProtocol::Linux64));
/// # Ok::<(), vmm_boot::ImageError>(())
/// ```
pub fn inspect_kernel<R: Read + Seek>(image: &mut R) -> Result<KernelInfo, ImageError> {
    Ok(inspect_image(image)?.0)
}

/// Reads the image's headers (the only parser of them in this crate) and
/// says what it is and what to load.
pub(crate) fn inspect_image<R: Read + Seek>(
    image: &mut R,
) -> Result<(KernelInfo, Payload), ImageError> {
    let len = image.seek(SeekFrom::End(0))?;
    image.rewind()?;
    let mut head = vec![0u8; len.min(1024) as usize];
    image.read_exact(&mut head)?;
    if head.len() >= 4 && head[..4] == ELF_MAGIC {
        return inspect_elf(image, &head, len);
    }
    if head.len() >= 0x240 && le32(&head, 0x202) == BZ_HEADER_MAGIC {
        return inspect_bzimage(image, &head, len);
    }
    let found = if head.is_empty() {
        "an empty file".to_string()
    } else {
        let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("leading bytes {}", shown.join(" "))
    };
    Err(ImageError::UnknownFormat { found })
}

fn inspect_elf<R: Read + Seek>(
    image: &mut R,
    head: &[u8],
    len: u64,
) -> Result<(KernelInfo, Payload), ImageError> {
    if head.len() < 64 {
        return Err(ImageError::UnsupportedElf("truncated ELF header"));
    }
    if head[4] != ELFCLASS64 {
        return Err(ImageError::UnsupportedElf("not a 64-bit ELF"));
    }
    if head[5] != ELFDATA2LSB {
        return Err(ImageError::UnsupportedElf("not little-endian"));
    }
    if le16(head, 18) != EM_X86_64 {
        return Err(ImageError::UnsupportedElf("not an x86_64 ELF"));
    }
    if le16(head, 16) != ET_EXEC {
        return Err(ImageError::UnsupportedElf(
            "not an executable (ET_EXEC) ELF",
        ));
    }
    let entry = le64(head, 24);
    let phoff = le64(head, 32);
    let phentsize = le16(head, 54);
    let phnum = le16(head, 56);
    if phentsize != 56 {
        return Err(ImageError::UnsupportedElf("unexpected program header size"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ImageError::UnsupportedElf("no or too many program headers"));
    }
    let table_len = u64::from(phnum) * 56;
    if phoff.checked_add(table_len).is_none_or(|end| end > len) {
        return Err(ImageError::UnsupportedElf(
            "program headers past the end of the file",
        ));
    }
    image.seek(SeekFrom::Start(phoff))?;
    let mut table = vec![0u8; table_len as usize];
    image.read_exact(&mut table)?;

    let mut segments = Vec::new();
    let mut notes = Vec::new();
    for ph in table.chunks_exact(56) {
        let p_type = le32(ph, 0);
        let offset = le64(ph, 8);
        let paddr = le64(ph, 24);
        let filesz = le64(ph, 32);
        let memsz = le64(ph, 40);
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(ImageError::UnsupportedElf(
                "segment past the end of the file",
            ));
        }
        match p_type {
            PT_LOAD if memsz > 0 => {
                if filesz > memsz || paddr.checked_add(memsz).is_none() {
                    return Err(ImageError::UnsupportedElf("segment sizes are inconsistent"));
                }
                segments.push(ElfSegment {
                    offset,
                    paddr,
                    filesz,
                    memsz,
                });
            }
            PT_NOTE if filesz <= MAX_NOTE_SEGMENT => notes.push((offset, filesz)),
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(ImageError::UnsupportedElf("no loadable segment"));
    }
    let mut pvh_entry = None;
    for (offset, size) in notes {
        image.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; size as usize];
        image.read_exact(&mut buf)?;
        if let Some(e) = find_pvh_note(&buf) {
            pvh_entry = Some(e);
            break;
        }
    }
    let loaded = |addr: u64| {
        segments
            .iter()
            .any(|s| addr >= s.paddr && addr - s.paddr < s.memsz)
    };
    if !loaded(entry) {
        return Err(ImageError::UnsupportedElf(
            "the entry point is outside every loaded segment",
        ));
    }
    if pvh_entry.is_some_and(|e| !loaded(e)) {
        return Err(ImageError::UnsupportedElf(
            "the PVH entry point is outside every loaded segment",
        ));
    }
    let lo = segments.iter().map(|s| s.paddr).min().unwrap_or(0);
    let hi = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    let mut protocols = Vec::new();
    if pvh_entry.is_some() {
        protocols.push(BootProtocol::Pvh);
    }
    protocols.push(BootProtocol::Linux64);
    let info = KernelInfo {
        format: KernelFormat::Elf,
        protocols,
        entry64: Some(entry),
        pvh_entry,
        load_range: GuestRange::new(lo, hi - lo),
        boot_protocol_version: None,
        kernel_version: None,
    };
    Ok((info, Payload::Elf(segments)))
}

/// Walks an ELF note segment for `Xen` / `XEN_ELFNOTE_PHYS32_ENTRY`.
fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = le32(notes, at) as usize;
        let descsz = le32(notes, at + 4) as usize;
        let kind = le32(notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let next = desc_at.checked_add(descsz.checked_next_multiple_of(4)?)?;
        if next > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes[name_at..name_at + namesz] == *b"Xen\0" {
            return match descsz {
                4 => Some(u64::from(le32(notes, desc_at))),
                8 => Some(le64(notes, desc_at)),
                _ => None,
            };
        }
        at = next;
    }
    None
}

fn inspect_bzimage<R: Read + Seek>(
    image: &mut R,
    head: &[u8],
    len: u64,
) -> Result<(KernelInfo, Payload), ImageError> {
    let version = le16(head, 0x206);
    if version < 0x0206 {
        return Err(ImageError::UnsupportedBzImage(
            "boot protocol older than 2.06",
        ));
    }
    if head[0x211] & BZ_LOADED_HIGH == 0 {
        return Err(ImageError::UnsupportedBzImage("zImage (not loaded high)"));
    }
    let xloadflags = le16(head, 0x236);
    if xloadflags & BZ_XLF_KERNEL_64 == 0 {
        return Err(ImageError::UnsupportedBzImage(
            "no 64-bit entry point (XLF_KERNEL_64)",
        ));
    }
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    if (setup_sects + 1) * 512 >= len {
        return Err(ImageError::UnsupportedBzImage(
            "setup sectors past the end of the file",
        ));
    }
    let offset = (setup_sects + 1) * 512;
    let payload_len = len - offset;
    // syssize: the protected-mode kernel in 16-byte paragraphs.
    let expected = u64::from(le32(head, 0x1f4)) * 16;
    if payload_len < expected {
        return Err(ImageError::TruncatedBzImage {
            expected,
            found: payload_len,
        });
    }
    let mut header = setup_header::default();
    let header_bytes = header.as_mut_slice();
    header_bytes.copy_from_slice(&head[0x1f1..0x1f1 + header_bytes.len()]);
    // `head` holds the first 1024 bytes: the file is longer than the setup.
    let pref = le64(head, 0x258);
    let init_size = u64::from(le32(head, 0x260));
    let kernel_version = match le16(head, 0x20e) {
        0 => None,
        off => read_cstr(image, u64::from(off) + 0x200, 128)?,
    };
    let info = KernelInfo {
        format: KernelFormat::BzImage,
        protocols: vec![BootProtocol::Linux64],
        entry64: Some(0x200),
        pvh_entry: None,
        load_range: if version >= 0x020a && init_size != 0 {
            GuestRange::new(pref, init_size)
        } else {
            None
        },
        boot_protocol_version: Some(version),
        kernel_version,
    };
    let payload = Payload::BzImage {
        header,
        offset,
        len: payload_len,
    };
    Ok((info, payload))
}

fn read_cstr<R: Read + Seek>(
    image: &mut R,
    at: u64,
    max: usize,
) -> Result<Option<String>, ImageError> {
    image.seek(SeekFrom::Start(at))?;
    let mut buf = Vec::with_capacity(max);
    image.take(max as u64).read_to_end(&mut buf)?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    Ok((!s.is_empty()).then_some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{tiny_bzimage, tiny_elf};
    use std::io::Cursor;

    #[test]
    fn elf_with_pvh_note_supports_both_protocols_pvh_first() {
        let elf = tiny_elf(0x10_0000, &[0xf4; 16], 0x2000, Some(0x10_0004));
        let info = inspect_kernel(&mut Cursor::new(elf)).unwrap();
        assert_eq!(info.format, KernelFormat::Elf);
        assert_eq!(
            info.protocols,
            vec![BootProtocol::Pvh, BootProtocol::Linux64]
        );
        assert_eq!(info.pvh_entry, Some(0x10_0004));
        assert_eq!(info.entry64, Some(0x10_0000));
        assert_eq!(info.load_range, GuestRange::new(0x10_0000, 0x2000));
    }

    #[test]
    fn elf_without_note_supports_only_linux64() {
        let elf = tiny_elf(0x20_0000, &[0xf4; 16], 16, None);
        let info = inspect_kernel(&mut Cursor::new(elf)).unwrap();
        assert_eq!(info.protocols, vec![BootProtocol::Linux64]);
        assert_eq!(info.pvh_entry, None);
    }

    #[test]
    fn the_test_guest_is_recognised() {
        let info = inspect_kernel(&mut Cursor::new(vmm_testguest::IMAGE)).unwrap();
        assert_eq!(
            info.protocols,
            vec![BootProtocol::Pvh, BootProtocol::Linux64]
        );
        assert_eq!(info.load_range.unwrap().start(), 0x10_0000);
    }

    #[test]
    fn bzimage_header_is_read() {
        let bz = tiny_bzimage(0x020f, BZ_XLF_KERNEL_64, &[0x90; 1024]);
        let info = inspect_kernel(&mut Cursor::new(bz)).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.protocols, vec![BootProtocol::Linux64]);
        assert_eq!(info.boot_protocol_version, Some(0x020f));
        assert_eq!(info.kernel_version.as_deref(), Some("6.1.0-test (ci)"));
        assert_eq!(info.load_range, GuestRange::new(0x100_0000, 0x40_0000));
        assert!(info.to_string().contains("boot protocol version: 2.15"));
    }

    #[test]
    fn a_bzimage_shorter_than_its_syssize_is_refused() {
        let mut bz = tiny_bzimage(0x020f, BZ_XLF_KERNEL_64, &[0x90; 1024]);
        bz.truncate(bz.len() - 17);
        match inspect_kernel(&mut Cursor::new(bz)) {
            Err(ImageError::TruncatedBzImage { expected, found }) => {
                assert_eq!((expected, found), (1024, 1007));
            }
            other => panic!("accepted a truncated bzImage: {other:?}"),
        }
    }

    #[test]
    fn an_entry_point_outside_the_loaded_segments_is_refused() {
        let mut elf = tiny_elf(0x10_0000, &[0xf4; 16], 16, None);
        elf[24..32].copy_from_slice(&0x50_0000u64.to_le_bytes());
        assert!(matches!(
            inspect_kernel(&mut Cursor::new(elf)),
            Err(ImageError::UnsupportedElf(msg)) if msg.contains("entry point")
        ));
        let elf = tiny_elf(0x10_0000, &[0xf4; 16], 16, Some(0x9_0000));
        assert!(matches!(
            inspect_kernel(&mut Cursor::new(elf)),
            Err(ImageError::UnsupportedElf(msg)) if msg.contains("PVH entry")
        ));
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let bz = tiny_bzimage(0x020f, 0, &[0x90; 1024]);
        assert!(matches!(
            inspect_kernel(&mut Cursor::new(bz)),
            Err(ImageError::UnsupportedBzImage(_))
        ));
    }

    #[test]
    fn text_and_empty_files_are_not_kernels() {
        for data in [&b"#!/bin/sh\necho hello\n"[..], &[][..]] {
            match inspect_kernel(&mut Cursor::new(data)) {
                Err(ImageError::UnknownFormat { found }) => assert!(!found.is_empty()),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_elf_headers_are_refused_not_panicked_on() {
        let good = tiny_elf(0x10_0000, &[0xf4; 16], 16, Some(0x10_0000));
        // Truncations at every length.
        for cut in 0..good.len() {
            let _ = inspect_kernel(&mut Cursor::new(&good[..cut]));
        }
        // Program header table pointing past the end.
        let mut bad = good.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            inspect_kernel(&mut Cursor::new(bad)),
            Err(ImageError::UnsupportedElf(_))
        ));
        // A 32-bit ELF.
        let mut bad = good.clone();
        bad[4] = 1;
        assert!(matches!(
            inspect_kernel(&mut Cursor::new(bad)),
            Err(ImageError::UnsupportedElf(_))
        ));
        // A note with a huge name size.
        let mut bad = good;
        let note_at = 64 + 2 * 56 + 16;
        bad[note_at..note_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let info = inspect_kernel(&mut Cursor::new(bad)).unwrap();
        assert_eq!(info.pvh_entry, None);
    }
}
