//! Loading a kernel and an initrd into guest memory.

use std::io::{Read, Seek};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};
use vmm_memory::AddressMap;

use crate::image::{inspect_segments, ElfSegment, KernelFormat, KernelInfo};
use crate::layout::{HIMEM_START, INITRD_ADDR_MAX_DEFAULT};
use crate::BootError;

const PAGE_SIZE: u64 = 4096;

/// A kernel placed in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// What the image is.
    pub info: KernelInfo,
    /// linux-loader's result: load address, end, setup header, PVH capability.
    pub result: KernelLoaderResult,
}

/// Loads `image` into `mem` after checking that every byte it occupies is RAM.
pub fn load_kernel<M, F>(
    mem: &M,
    map: &AddressMap,
    image: &mut F,
) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let (info, segments) = inspect_segments(image)?;
    let result = match info.format {
        KernelFormat::Elf => {
            for s in &segments {
                check_fits(map, s.paddr, s.memsz)?;
            }
            let r = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::Load)?;
            zero_bss(mem, &segments)?;
            r
        }
        KernelFormat::BzImage => {
            let len = image
                .seek(std::io::SeekFrom::End(0))
                .map_err(BootError::KernelRead)?;
            let r = BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::Load)?;
            check_fits(
                map,
                r.kernel_load.0,
                len.min(r.kernel_end - r.kernel_load.0),
            )?;
            if let Some((lo, hi)) = info.load_range {
                check_fits(map, lo, hi - lo)?;
            }
            r
        }
    };
    Ok(LoadedKernel { info, result })
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

/// linux-loader copies `p_filesz` bytes; the rest of each segment (`.bss`)
/// must read as zero even when the memory was used before.
fn zero_bss<M: GuestMemoryBackend>(mem: &M, segments: &[ElfSegment]) -> Result<(), BootError> {
    let zeros = [0u8; 4096];
    for s in segments {
        let mut addr = s.paddr + s.filesz;
        let end = s.paddr + s.memsz;
        while addr < end {
            let n = (end - addr).min(zeros.len() as u64) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(addr))
                .map_err(BootError::Memory)?;
            addr += n as u64;
        }
    }
    Ok(())
}

/// Places the initrd in the highest page-aligned spot of low RAM that ends
/// below `addr_max` and starts after `kernel_end`; returns (address, size).
pub fn load_initrd<M, F>(
    mem: &M,
    map: &AddressMap,
    initrd: &mut F,
    kernel_end: u64,
    addr_max: Option<u64>,
) -> Result<(u64, u64), BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let size = initrd
        .seek(std::io::SeekFrom::End(0))
        .map_err(BootError::InitrdRead)?;
    initrd.rewind().map_err(BootError::InitrdRead)?;
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
        .filter(|&a| a >= lowest && size > 0)
        .ok_or(BootError::InitrdDoesNotFit {
            size,
            room: limit.saturating_sub(lowest),
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit { size, room: 0 })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::{tiny_bzimage, tiny_elf};
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    fn setup(mib: u64) -> (AddressMap, GuestMemoryMmap) {
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
        assert_eq!(k.result.kernel_load, GuestAddress(0x20_0000));
        assert_eq!(k.result.kernel_end, 0x20_0100);
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
        assert_eq!(k.result.kernel_load, GuestAddress(0x10_0000));
        let magic = { k.result.setup_header.unwrap().header };
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
        let (addr, size) =
            load_initrd(&mem, &map, &mut Cursor::new(&data), 0x20_0000, None).unwrap();
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
            Err(BootError::InitrdDoesNotFit { size: 0, .. })
        ));
    }
}
