//! Guest RAM backed by host memory.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout::AddressMap;

/// Guest RAM as vm-memory sees it: one mmap region per RAM range of the map,
/// each with a bitmap of the pages the VMM's own code (devices, boot
/// loading) wrote, one bit per 4 KiB page; with KVM's dirty log for what the
/// guest wrote, it tells which pages a diff snapshot must save.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Size of the huge pages used by [`RamBacking::HugePages`].
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

const HUGEPAGES_FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// What host memory backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// Private anonymous memory: the simplest and the default.
    #[default]
    Anonymous,
    /// A shared memfd: the RAM can later be written to or restored from a
    /// snapshot file, or shared with another process.
    Memfd,
    /// A memfd of 2 MiB huge pages; fails with
    /// [`RamError::HugePagesUnavailable`] where the host has too few.
    HugePages,
}

/// Why guest RAM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// `memfd_create` failed.
    #[error("cannot create the memfd backing guest RAM")]
    Memfd(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the memfd backing guest RAM to {size} bytes")]
    MemfdSize {
        /// Bytes asked for.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The host has fewer free huge pages than the RAM needs.
    #[error(
        "guest RAM needs {needed} free 2 MiB huge pages but the host has {free} \
         (see {HUGEPAGES_FREE}; raise vm.nr_hugepages)"
    )]
    HugePagesUnavailable {
        /// Pages needed.
        needed: u64,
        /// Pages free on the host.
        free: u64,
    },
    /// A RAM range is not a multiple of the huge page size.
    #[error("guest RAM of {size} bytes is not a multiple of the 2 MiB huge page size")]
    HugePageAlignment {
        /// The RAM size.
        size: u64,
    },
    /// A RAM range does not fit the host's address space.
    #[error("a guest RAM range of {size} bytes does not fit this host")]
    TooLargeForHost {
        /// Bytes asked for.
        size: u64,
    },
    /// mmap or region registration failed.
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Creates guest RAM for every RAM range of `map`, backed as `backing` says.
///
/// With a memfd backing, the ranges are consecutive slices of one file, in
/// address order, so the file is an image of guest RAM without the gaps.
pub fn create_guest_ram(map: &AddressMap, backing: RamBacking) -> Result<GuestRam, RamError> {
    let total = map.ram_size();
    let file = match backing {
        RamBacking::Anonymous => None,
        RamBacking::Memfd => Some(memfd(c"guest-ram", 0, total)?),
        RamBacking::HugePages => {
            if total % HUGE_PAGE_SIZE != 0 {
                return Err(RamError::HugePageAlignment { size: total });
            }
            let needed = total / HUGE_PAGE_SIZE;
            let free = free_huge_pages();
            if free < needed {
                return Err(RamError::HugePagesUnavailable { needed, free });
            }
            Some(memfd(
                c"guest-ram-huge",
                libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
                total,
            )?)
        }
    };
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(map.ram().len());
    for r in map.ram() {
        let size =
            usize::try_from(r.len()).map_err(|_| RamError::TooLargeForHost { size: r.len() })?;
        let file_offset = file.as_ref().map(|f| {
            // Each region gets its own handle to the same file.
            f.try_clone().map(|f| FileOffset::new(f, offset))
        });
        let file_offset = file_offset.transpose().map_err(RamError::Memfd)?;
        ranges.push((GuestAddress(r.start()), size, file_offset));
        offset += r.len();
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(RamError::Map)
}

fn memfd(name: &CStr, flags: libc::c_uint, size: u64) -> Result<File, RamError> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no memory
    // effect on this process.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(RamError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| RamError::MemfdSize { size, source })?;
    Ok(file)
}

fn free_huge_pages() -> u64 {
    std::fs::read_to_string(HUGEPAGES_FREE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{HIGH_RAM_START, MMIO_GAP_START};
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn anonymous_ram_has_one_region_per_range_and_is_usable() {
        let map = AddressMap::new(16 << 20).unwrap();
        let ram = create_guest_ram(&map, RamBacking::Anonymous).unwrap();
        assert_eq!(ram.num_regions(), 1);
        ram.write_obj(0x1234_5678_u32, GuestAddress((16 << 20) - 4))
            .unwrap();
        assert_eq!(
            ram.read_obj::<u32>(GuestAddress((16 << 20) - 4)).unwrap(),
            0x1234_5678
        );
        assert!(ram.read_obj::<u32>(GuestAddress(16 << 20)).is_err());
    }

    #[test]
    fn memfd_ram_lays_ranges_out_consecutively_in_one_file() {
        let map = AddressMap::new(MMIO_GAP_START + (4 << 20)).unwrap();
        let ram = create_guest_ram(&map, RamBacking::Memfd).unwrap();
        let regions: Vec<_> = ram.iter().collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].start_addr(), GuestAddress(0));
        assert_eq!(regions[1].start_addr(), GuestAddress(HIGH_RAM_START));
        let offsets: Vec<u64> = regions
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, vec![0, MMIO_GAP_START]);
        // The gap is not RAM.
        assert!(ram.read_obj::<u8>(GuestAddress(MMIO_GAP_START)).is_err());
        ram.write_obj(7u8, GuestAddress(HIGH_RAM_START)).unwrap();
        let mut byte = [0u8; 1];
        let f = regions[1].file_offset().unwrap().file();
        std::os::unix::fs::FileExt::read_exact_at(f, &mut byte, MMIO_GAP_START).unwrap();
        assert_eq!(byte[0], 7, "write through guest RAM reaches the memfd");
    }

    #[test]
    fn huge_pages_fail_clearly_when_the_host_has_too_few() {
        let map = AddressMap::new(64 << 20).unwrap();
        let free = free_huge_pages();
        match create_guest_ram(&map, RamBacking::HugePages) {
            Err(RamError::HugePagesUnavailable { needed, free: seen }) => {
                assert_eq!(needed, 32);
                assert!(seen < 32);
            }
            Ok(_) => assert!(free >= 32, "huge pages succeeded with only {free} free"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn huge_pages_refuse_sizes_not_multiple_of_2mib() {
        let map = AddressMap::new((64 << 20) + 4096).unwrap();
        assert!(matches!(
            create_guest_ram(&map, RamBacking::HugePages),
            Err(RamError::HugePageAlignment { .. })
        ));
    }
}
