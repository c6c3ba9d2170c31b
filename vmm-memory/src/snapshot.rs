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
//! A *diff* layer ([`write_pages`]) holds only the pages written since the
//! previous snapshot (every one of them written, zero or not, so that its
//! data extents are exactly those pages); layers apply over a base in order
//! ([`apply_layer`] onto RAM, [`merge_layer`] onto a base file).
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

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::bitmap::NewBitmap;
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
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
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

/// The data extents of `file` within `[from, to)`, as `(start, end)` file
/// offsets (holes skipped).
fn data_extents(file: &File, from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let Some(data) = seek(file, at, libc::SEEK_DATA).filter(|&d| d < to) else {
            break;
        };
        let end = seek(file, data, libc::SEEK_HOLE).unwrap_or(to).min(to);
        out.push((data, end));
        at = end;
    }
    out
}

/// Writes the pages of `ram` marked in `dirty` (one bitmap per region, in
/// region order, one bit per [`PAGE_SIZE`] page, as KVM's dirty log and
/// vm-memory's bitmaps give them) into `file` at their offsets in the file
/// layout, every marked page written even if it is zero; the file is sized
/// to the RAM, the rest left as holes. Returns the bytes written.
pub fn write_pages(
    ram: &GuestRam,
    dirty: &[Vec<u64>],
    file: &File,
) -> Result<u64, MemoryFileError> {
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    let mut written = 0u64;
    for (region, bits) in ram
        .iter()
        .zip(dirty.iter().chain(std::iter::repeat(&Vec::new())))
    {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE as u64;
        let marked = |p: u64| {
            bits.get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        };
        let mut p = 0u64;
        while p < pages {
            if !marked(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && marked(p) && (p - start) < (CHUNK / PAGE_SIZE) as u64 {
                p += 1;
            }
            let len = ((p - start) * PAGE_SIZE as u64) as usize;
            let addr = base + start * PAGE_SIZE as u64;
            ram.read_slice(&mut buf[..len], GuestAddress(addr))
                .map_err(|_| MemoryFileError::ReadRam { addr })?;
            file.write_all_at(&buf[..len], file_offset + start * PAGE_SIZE as u64)
                .map_err(MemoryFileError::Write)?;
            written += len as u64;
        }
        file_offset += region.len();
    }
    file.set_len(file_offset).map_err(MemoryFileError::Write)?;
    Ok(written)
}

/// The pages the VMM's own code wrote in each region of `ram` since the
/// last call (vm-memory's bitmaps, one per region, in region order), and
/// clears them: with KVM's dirty log, what a diff layer saves.
pub fn take_written_pages(ram: &GuestRam) -> Vec<Vec<u64>> {
    ram.iter().map(|r| (**r).bitmap().get_and_reset()).collect()
}

/// Copies the data of a diff layer `file` into `ram` (laid out by `map`),
/// over what is there: the layer's pages win. Returns the bytes copied.
pub fn apply_layer(map: &AddressMap, ram: &GuestRam, file: &File) -> Result<u64, MemoryFileError> {
    check_size(map, file)?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    let mut copied = 0u64;
    for r in map.ram() {
        for (start, end) in data_extents(file, file_offset, file_offset + r.len()) {
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(CHUNK);
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(MemoryFileError::Read)?;
                let addr = r.start() + (pos - file_offset);
                ram.write_slice(&buf[..n], GuestAddress(addr))
                    .map_err(|_| MemoryFileError::ReadRam { addr })?;
                pos += n as u64;
                copied += n as u64;
            }
        }
        file_offset += r.len();
    }
    Ok(copied)
}

/// Merges the diff layer `layer` into `base` (a full memory file of the
/// same size): afterwards `base` is what restoring both would give. Returns
/// the bytes copied.
pub fn merge_layer(base: &File, layer: &File) -> Result<u64, MemoryFileError> {
    let size = base.metadata().map_err(MemoryFileError::Read)?.len();
    let actual = layer.metadata().map_err(MemoryFileError::Read)?.len();
    if actual != size {
        return Err(MemoryFileError::Size {
            expected: size,
            actual,
        });
    }
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    for (start, end) in data_extents(layer, 0, size) {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            layer
                .read_exact_at(&mut buf[..n], pos)
                .map_err(MemoryFileError::Read)?;
            base.write_all_at(&buf[..n], pos)
                .map_err(MemoryFileError::Write)?;
            pos += n as u64;
            copied += n as u64;
        }
    }
    base.sync_data().map_err(MemoryFileError::Write)?;
    Ok(copied)
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
    fn diff_layers_carry_written_zero_pages_and_apply_or_merge_alike() {
        let map = AddressMap::new(MMIO_GAP_START + (4 << 20)).unwrap();
        let ram = create_guest_ram(&map, RamBacking::Anonymous).unwrap();
        ram.write_slice(&[5u8; 2 * PAGE_SIZE], GuestAddress(0x3000))
            .unwrap();
        let base = temp_file();
        write_sparse(&ram, &base).unwrap();
        // vm-memory marked what was written through it; start a new epoch.
        let first = ram.iter().next().unwrap();
        assert!((**first).bitmap().is_addr_set(0x3000));
        take_written_pages(&ram);
        // Since the base: a page zeroed, a page written in the high range.
        ram.write_slice(&[0u8; PAGE_SIZE], GuestAddress(0x3000))
            .unwrap();
        ram.write_obj(9u32, GuestAddress(HIGH_RAM_START + 0x2000))
            .unwrap();
        let dirty = take_written_pages(&ram);
        let layer = temp_file();
        let written = write_pages(&ram, &dirty, &layer).unwrap();
        assert_eq!(written, 2 * PAGE_SIZE as u64, "the zeroed page too");
        // Onto RAM mapped from the base ...
        let restored = map_private(&map, &base).unwrap();
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 5);
        apply_layer(&map, &restored, &layer).unwrap();
        // ... and merged into the base file: the same guest memory.
        merge_layer(&base, &layer).unwrap();
        let merged = map_private(&map, &base).unwrap();
        for ram in [&restored, &merged] {
            assert_eq!(ram.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
            assert_eq!(ram.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 5);
            assert_eq!(
                ram.read_obj::<u32>(GuestAddress(HIGH_RAM_START + 0x2000))
                    .unwrap(),
                9
            );
        }
        let short = temp_file();
        short.set_len(4096).unwrap();
        assert!(matches!(
            merge_layer(&base, &short),
            Err(MemoryFileError::Size { .. })
        ));
        assert!(matches!(
            apply_layer(&map, &restored, &short),
            Err(MemoryFileError::Size { .. })
        ));
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
