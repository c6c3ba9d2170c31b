//! Loading a kernel and an initrd into guest memory, from what
//! [`inspect_kernel`](crate::inspect_kernel)'s parser found in the headers.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};
use vmm_memory::{AddressMap, GuestRange};

use crate::error::BootError;
use crate::image::{inspect_image, ElfSegment, KernelInfo, Payload};
use crate::layout::{HIMEM_START, INITRD_ADDR_MAX_DEFAULT};

const PAGE_SIZE: u64 = 4096;

/// A kernel placed in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// What the image is.
    pub info: KernelInfo,
    /// Guest physical addresses the loaded bytes occupy.
    pub loaded: GuestRange,
    /// The 64-bit entry point (Linux boot protocol).
    pub entry64: u64,
    /// The PVH entry point, if the image has one.
    pub pvh_entry: Option<u64>,
    /// A bzImage's setup header, with `code32_start` set to where its kernel
    /// went.
    pub setup_header: Option<setup_header>,
}

/// Loads `image` into `mem` after checking that every byte it occupies is
/// RAM above 1 MiB.
pub fn load_kernel<M, F>(
    mem: &M,
    map: &AddressMap,
    image: &mut F,
) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let (info, payload) = inspect_image(image)?;
    match payload {
        Payload::Elf(segments) => {
            for s in &segments {
                check_fits(map, s.paddr, s.memsz)?;
            }
            for s in &segments {
                load_segment(mem, image, s)?;
            }
            let range = info.load_range.ok_or(BootError::KernelDoesNotFit {
                start: 0,
                end: 0,
                ram_end: map.ram()[0].end(),
            })?;
            Ok(LoadedKernel {
                loaded: range,
                entry64: info.entry64.unwrap_or(range.start()),
                pvh_entry: info.pvh_entry,
                setup_header: None,
                info,
            })
        }
        Payload::BzImage {
            mut header,
            offset,
            len,
        } => {
            // The protected-mode kernel goes at 1 MiB, where the boot
            // protocol's loaders put it; its decompressor needs `init_size`
            // from its preferred address too.
            check_fits(map, HIMEM_START, len)?;
            if let Some(r) = info.load_range {
                check_fits(map, r.start(), r.len())?;
            }
            image
                .seek(SeekFrom::Start(offset))
                .map_err(BootError::KernelRead)?;
            let n = usize::try_from(len).map_err(|_| BootError::KernelDoesNotFit {
                start: HIMEM_START,
                end: u64::MAX,
                ram_end: map.ram()[0].end(),
            })?;
            mem.read_exact_volatile_from(GuestAddress(HIMEM_START), image, n)
                .map_err(BootError::Memory)?;
            header.code32_start = HIMEM_START as u32;
            let loaded = GuestRange::new(HIMEM_START, len.max(1))
                .ok_or(BootError::BootStructuresDoNotFit)?;
            Ok(LoadedKernel {
                loaded,
                // The 64-bit entry of a bzImage is 0x200 past its start.
                entry64: HIMEM_START + 0x200,
                pvh_entry: None,
                setup_header: Some(header),
                info,
            })
        }
    }
}

/// Copies a segment's file bytes and zeroes the rest of it (`.bss`), which
/// must read as zero even where memory was used before.
fn load_segment<M, F>(mem: &M, image: &mut F, s: &ElfSegment) -> Result<(), BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    image
        .seek(SeekFrom::Start(s.offset))
        .map_err(BootError::KernelRead)?;
    let n = usize::try_from(s.filesz).map_err(|_| BootError::BootStructuresDoNotFit)?;
    mem.read_exact_volatile_from(GuestAddress(s.paddr), image, n)
        .map_err(BootError::Memory)?;
    let zeros = [0u8; 4096];
    let mut addr = s.paddr + s.filesz;
    let end = s.paddr + s.memsz;
    while addr < end {
        let n = (end - addr).min(zeros.len() as u64) as usize;
        mem.write_slice(&zeros[..n], GuestAddress(addr))
            .map_err(BootError::Memory)?;
        addr += n as u64;
    }
    Ok(())
}

fn check_fits(map: &AddressMap, start: u64, len: u64) -> Result<(), BootError> {
    if len == 0 {
        return Ok(());
    }
    if start < HIMEM_START || !map.is_ram(start, len) {
        return Err(BootError::KernelDoesNotFit {
            start,
            end: start.saturating_add(len),
            ram_end: map.ram()[0].end(),
        });
    }
    Ok(())
}

/// Places the initrd in the highest page-aligned spot of low RAM that ends
/// below `addr_max` and starts after `kernel_end`; returns where it went.
pub fn load_initrd<M, F>(
    mem: &M,
    map: &AddressMap,
    initrd: &mut F,
    kernel_end: u64,
    addr_max: Option<u64>,
) -> Result<GuestRange, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let size = initrd
        .seek(std::io::SeekFrom::End(0))
        .map_err(BootError::InitrdRead)?;
    initrd.rewind().map_err(BootError::InitrdRead)?;
    if size == 0 {
        return Err(BootError::InitrdEmpty);
    }
    let low_end = map.ram()[0].end();
    let limit = low_end.min(
        addr_max
            .unwrap_or(INITRD_ADDR_MAX_DEFAULT)
            .saturating_add(1),
    );
    let lowest = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= lowest)
        .ok_or(BootError::InitrdDoesNotFit {
            size,
            room: limit.saturating_sub(lowest),
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit { size, room: 0 })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(BootError::Memory)?;
    GuestRange::new(addr, size).ok_or(BootError::InitrdDoesNotFit { size, room: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{tiny_bzimage, tiny_elf};
    use std::io::Cursor;

    fn setup(mib: u64) -> (AddressMap, vmm_memory::GuestRam) {
        let map = AddressMap::new(mib << 20).unwrap();
        let mem = vmm_memory::create_guest_ram(&map, vmm_memory::RamBacking::Anonymous).unwrap();
        (map, mem)
    }

    #[test]
    fn elf_segments_are_copied_and_bss_is_zeroed() {
        let (map, mem) = setup(16);
        // Dirty the memory the bss will occupy.
        mem.write_slice(&[0xaa; 64], GuestAddress(0x20_0010))
            .unwrap();
        let elf = tiny_elf(
            0x20_0000,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            0x100,
            None,
        );
        let k = load_kernel(&mem, &map, &mut Cursor::new(elf)).unwrap();
        assert_eq!(k.loaded, GuestRange::new(0x20_0000, 0x100).unwrap());
        assert_eq!(k.entry64, 0x20_0000);
        let mut buf = [0u8; 80];
        mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(
            &buf[..16],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert!(buf[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn elf_beyond_ram_is_refused_before_anything_is_written() {
        let (map, mem) = setup(8);
        let elf = tiny_elf(0x400_0000, &[0xf4; 16], 16, None);
        match load_kernel(&mem, &map, &mut Cursor::new(elf)) {
            Err(BootError::KernelDoesNotFit { start, ram_end, .. }) => {
                assert_eq!((start, ram_end), (0x400_0000, 8 << 20));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn elf_below_1mib_is_refused() {
        let (map, mem) = setup(8);
        let elf = tiny_elf(0x1000, &[0xf4; 16], 16, None);
        assert!(matches!(
            load_kernel(&mem, &map, &mut Cursor::new(elf)),
            Err(BootError::KernelDoesNotFit { .. })
        ));
    }

    #[test]
    fn bzimage_payload_is_loaded_at_code32_start() {
        let (map, mem) = setup(32);
        let bz = tiny_bzimage(0x020f, 1, &[0x90; 1024]);
        let k = load_kernel(&mem, &map, &mut Cursor::new(bz)).unwrap();
        assert_eq!(k.loaded.start(), 0x10_0000);
        assert_eq!(k.entry64, 0x10_0200);
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        let magic = { hdr.header };
        assert_eq!(magic, 0x5372_6448);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x10_0000 + 1023)).unwrap(),
            0x90
        );
    }

    #[test]
    fn bzimage_needing_more_than_ram_is_refused() {
        // init_size puts the decompressed kernel at 16 MiB + 4 MiB.
        let (map, mem) = setup(8);
        let bz = tiny_bzimage(0x020f, 1, &[0x90; 1024]);
        assert!(matches!(
            load_kernel(&mem, &map, &mut Cursor::new(bz)),
            Err(BootError::KernelDoesNotFit { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let (map, mem) = setup(16);
        let data = vec![0x5a; 5000];
        let r = load_initrd(&mem, &map, &mut Cursor::new(&data), 0x20_0000, None).unwrap();
        let (addr, size) = (r.start(), r.len());
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 16 << 20 && addr + size + PAGE_SIZE > 16 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0x5a);
    }

    #[test]
    fn initrd_that_does_not_fit_is_an_error() {
        let (map, mem) = setup(4);
        let data = vec![0u8; 3 << 20];
        assert!(matches!(
            load_initrd(&mem, &map, &mut Cursor::new(&data), 0x20_0000, None),
            Err(BootError::InitrdDoesNotFit { .. })
        ));
        assert!(matches!(
            load_initrd(&mem, &map, &mut Cursor::new(&[]), 0x20_0000, None),
            Err(BootError::InitrdEmpty)
        ));
    }
}
