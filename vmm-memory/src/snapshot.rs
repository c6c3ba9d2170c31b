//! Guest RAM to and from a memory snapshot file.
//!
//! The file holds RAM's ranges one after another in address order, the
//! gaps left out (the layout the memfd backing uses), so a file offset is
//! the RAM bytes below the address. Pages that are all zero are never
//! written: they stay holes, and a file of a 1 GiB guest that touched
//! 20 MiB takes about 20 MiB of disk.
//!
//! Restoring maps the file privately ([`map_private`]): a page is read from
//! the file when the guest first touches it, and the guest's writes stay in
//! the process (the file never changes); or copies it into anonymous RAM at
//! once ([`load_eager`]), skipping the holes.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_memory::snapshot::{map_private, write_sparse};
//! use vmm_memory::{create_guest_ram, AddressMap, RamBacking};
//!
//! let map = AddressMap::new(16 << 20)?;
//! let ram = create_guest_ram(&map, RamBacking::Anonymous)?;
//! ram.write_obj(0xfeed_u32, GuestAddress(0x10_0000))?;
//! let file = tempfile_for_doc();
//! let written = write_sparse(&ram, &file)?;
//! assert_eq!(written, 4096, "one page is not zero");
//! let restored = map_private(&map, &file)?;
//! assert_eq!(restored.read_obj::<u32>(GuestAddress(0x10_0000))?, 0xfeed);
//! # fn tempfile_for_doc() -> std::fs::File {
//! #     let p = std::env::temp_dir().join(format!("vmm-memory-doc-{}", std::process::id()));
//! #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
//! #     std::fs::remove_file(&p).unwrap();
//! #     f
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::layout::AddressMap;
use crate::ram::{create_guest_ram, GuestRam, RamBacking};

/// The page size holes are made of.
pub const PAGE_SIZE: usize = 4096;

/// Bytes read from guest RAM at a time while writing.
const CHUNK: usize = 1 << 20;

/// Why a memory file could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Writing the file failed (a full disk, say).
    #[error("cannot write guest RAM to the memory file")]
    Write(#[source] io::Error),
    /// Reading guest RAM failed.
    #[error("cannot read guest RAM at {addr:#x}")]
    ReadRam {
        /// The guest address.
        addr: u64,
    },
    /// The file is not the size of this VM's RAM.
    #[error("the memory file is {actual} bytes; this VM's RAM is {expected} bytes")]
    Size {
        /// The RAM's size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// Reading the file failed.
    #[error("cannot read the memory file")]
    Read(#[source] io::Error),
    /// Mapping the file failed.
    #[error("cannot map the memory file: {0}")]
    Map(String),
    /// Anonymous RAM for an eager load could not be made.
    #[error(transparent)]
    Ram(#[from] crate::ram::RamError),
}

fn is_zero(page: &[u8]) -> bool {
    // Compare a word at a time; the tail (none for whole pages) bytewise.
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words; align_to
        // gives only correctly aligned, in-bounds middle words.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes every RAM region of `ram` into `file` at its offset in the file
/// layout, leaving all-zero pages as holes, then sizes the file to the RAM
/// (so trailing zero pages are holes too). Returns the bytes written.
pub fn write_sparse(ram: &GuestRam, file: &File) -> Result<u64, MemoryFileError> {
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    let mut written = 0u64;
    for region in ram.iter() {
        let len = region.len();
        let base = region.start_addr().0;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let addr = base + done;
            ram.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|_| MemoryFileError::ReadRam { addr })?;
            // Coalesce runs of non-zero pages into one write each.
            let mut page = 0;
            while page < n {
                let end = (page + PAGE_SIZE).min(n);
                if is_zero(&buf[page..end]) {
                    page = end;
                    continue;
                }
                let start = page;
                page = end;
                while page < n && !is_zero(&buf[page..(page + PAGE_SIZE).min(n)]) {
                    page = (page + PAGE_SIZE).min(n);
                }
                file.write_all_at(&buf[start..page], file_offset + done + start as u64)
                    .map_err(MemoryFileError::Write)?;
                written += (page - start) as u64;
            }
            done += n as u64;
        }
        file_offset += len;
    }
    file.set_len(file_offset).map_err(MemoryFileError::Write)?;
    Ok(written)
}

fn check_size(map: &AddressMap, file: &File) -> Result<(), MemoryFileError> {
    let actual = file.metadata().map_err(MemoryFileError::Read)?.len();
    let expected = map.ram_size();
    if actual != expected {
        return Err(MemoryFileError::Size { expected, actual });
    }
    Ok(())
}

/// Guest RAM for `map` mapped privately from `file` (see the [module
/// documentation](self)); the file must be exactly the RAM's size.
pub fn map_private(map: &AddressMap, file: &File) -> Result<GuestRam, MemoryFileError> {
    check_size(map, file)?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(map.ram().len());
    for r in map.ram() {
        let size = usize::try_from(r.len()).map_err(|_| {
            MemoryFileError::Map(format!(
                "a RAM range of {} bytes does not fit this host",
                r.len()
            ))
        })?;
        let handle = file.try_clone().map_err(MemoryFileError::Read)?;
        let region = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(handle, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.start()))
            .ok_or_else(|| MemoryFileError::Map("a RAM range wraps the address space".into()))?;
        regions.push(region);
        offset += r.len();
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Map(e.to_string()))
}

/// Guest RAM for `map` backed as `backing` says and filled from `file` at
/// once (holes are skipped: they read as zero anyway).
pub fn load_eager(
    map: &AddressMap,
    file: &File,
    backing: RamBacking,
) -> Result<GuestRam, MemoryFileError> {
    check_size(map, file)?;
    let ram = create_guest_ram(map, backing)?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    for r in map.ram() {
        let mut done = 0u64;
        while done < r.len() {
            let at = file_offset + done;
            // Skip to the next data: holes are zero already.
            let data = seek(file, at, libc::SEEK_DATA);
            let Some(data) = data.filter(|&d| d < file_offset + r.len()) else {
                break;
            };
            let hole = seek(file, data, libc::SEEK_HOLE).unwrap_or(file_offset + r.len());
            let end = hole.min(file_offset + r.len());
            let mut pos = data;
            while pos < end {
                let n = ((end - pos) as usize).min(CHUNK);
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(MemoryFileError::Read)?;
                ram.write_slice(&buf[..n], GuestAddress(r.start() + (pos - file_offset)))
                    .map_err(|_| MemoryFileError::ReadRam {
                        addr: r.start() + (pos - file_offset),
                    })?;
                pos += n as u64;
            }
            done = end - file_offset;
        }
        file_offset += r.len();
    }
    Ok(ram)
}

/// `lseek(fd, at, whence)`; `None` past the data (ENXIO).
fn seek(file: &File, at: u64, whence: libc::c_int) -> Option<u64> {
    let at = i64::try_from(at).ok()?;
    // SAFETY: lseek on a descriptor this function borrows; no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    u64::try_from(r).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{HIGH_RAM_START, MMIO_GAP_START};
    use std::os::unix::fs::MetadataExt;

    fn temp_file() -> File {
        let p = std::env::temp_dir().join(format!(
            "vmm-memory-snap-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn only_touched_pages_take_disk_and_both_ranges_come_back() {
        let map = AddressMap::new(MMIO_GAP_START + (8 << 20)).unwrap();
        let ram = create_guest_ram(&map, RamBacking::Anonymous).unwrap();
        ram.write_obj(1u8, GuestAddress(0)).unwrap();
        ram.write_slice(&[2u8; 3 * PAGE_SIZE], GuestAddress(0x20_0000))
            .unwrap();
        ram.write_obj(3u64, GuestAddress(HIGH_RAM_START + 0x1000))
            .unwrap();
        let f = temp_file();
        let written = write_sparse(&ram, &f).unwrap();
        assert_eq!(written, 5 * PAGE_SIZE as u64);
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), map.ram_size());
        assert!(
            meta.blocks() * 512 <= 64 * PAGE_SIZE as u64,
            "sparse: {} blocks",
            meta.blocks()
        );
        for restored in [
            map_private(&map, &f).unwrap(),
            load_eager(&map, &f, RamBacking::Anonymous).unwrap(),
        ] {
            assert_eq!(restored.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
            let mut b = [0u8; 3 * PAGE_SIZE];
            restored
                .read_slice(&mut b, GuestAddress(0x20_0000))
                .unwrap();
            assert!(b.iter().all(|&x| x == 2));
            assert_eq!(
                restored
                    .read_obj::<u64>(GuestAddress(HIGH_RAM_START + 0x1000))
                    .unwrap(),
                3
            );
            assert_eq!(
                restored.read_obj::<u64>(GuestAddress(0x100_0000)).unwrap(),
                0
            );
        }
    }

    #[test]
    fn a_private_mapping_never_changes_the_file_and_clones_are_independent() {
        let map = AddressMap::new(4 << 20).unwrap();
        let ram = create_guest_ram(&map, RamBacking::Anonymous).unwrap();
        ram.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let f = temp_file();
        write_sparse(&ram, &f).unwrap();
        let a = map_private(&map, &f).unwrap();
        let b = map_private(&map, &f).unwrap();
        a.write_obj(8u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
        let mut word = [0u8; 4];
        f.read_exact_at(&mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 7, "the file is unchanged");
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        let map = AddressMap::new(4 << 20).unwrap();
        let f = temp_file();
        f.set_len(3 << 20).unwrap();
        for r in [
            map_private(&map, &f).map(|_| ()),
            load_eager(&map, &f, RamBacking::Anonymous).map(|_| ()),
        ] {
            match r {
                Err(MemoryFileError::Size { expected, actual }) => {
                    assert_eq!((expected, actual), (4 << 20, 3 << 20));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
