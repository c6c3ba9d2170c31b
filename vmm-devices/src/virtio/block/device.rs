//! The virtio-blk device.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::request::{DiscardSegment, RequestHeader, RequestType};
use crate::virtio::{
    drain_queue, read_config_bytes, ActivateError, ActivationContext, QueueBudget, VirtioDevice,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (advertised as `seg_max`).
pub const SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Host bounce buffer: data moves between the file and guest memory in
/// chunks of this size.
const CHUNK: usize = 128 * 1024;
/// Bytes of `struct virtio_blk_config` this device exposes.
const CONFIG_SPACE_SIZE: usize = 60;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The image is a directory or another non-file.
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The image's size could not be read.
    #[error("cannot read the size of the disk image")]
    Size(#[source] io::Error),
    /// The serial is longer than virtio-blk's 20-byte id.
    #[error("disk serial {serial:?} is longer than {ID_BYTES} bytes")]
    SerialTooLong {
        /// The serial.
        serial: String,
    },
}

/// The file side of the device.
struct Backend {
    file: File,
    read_only: bool,
    id: [u8; ID_BYTES],
    capacity: u64,
    buf: Vec<u8>,
    broken_chains: u64,
}

/// How a request ended, for its status byte.
type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as u8;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as u8;

impl Backend {
    /// Handles one chain; returns the bytes written into its device-writable
    /// buffers (data and status), or `None` if it has no status byte to
    /// write an answer to.
    fn handle<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Option<u32> {
        let data_chain = chain.clone();
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                log::debug!("virtio-blk: chain with buffers outside guest memory");
                return None;
            }
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            log::debug!("virtio-blk: chain without a status byte");
            return None;
        }
        let mut status_writer = writer.split_at(writable - 1).ok()?;
        let (status, data_written) = match reader.read_obj::<RequestHeader>() {
            // Reads go straight from the file into guest memory: the Writer
            // above has checked every writable buffer lies in guest RAM.
            Ok(h) if RequestType::from(h.request_type.to_native()) == RequestType::In => {
                let len = (writable - 1) as u64;
                let status = self.read_direct(mem, data_chain, h.sector.to_native(), len);
                (status, if status == S_OK { len as u32 } else { 0 })
            }
            Ok(h) => self.execute(&h, &mut reader, &mut writer),
            Err(_) => (S_IOERR, 0),
        };
        status_writer.write_all(&[status]).ok()?;
        Some(data_written + 1)
    }

    fn execute<B: BitmapSlice>(
        &mut self,
        h: &RequestHeader,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> (Status, u32) {
        let sector = h.sector.to_native();
        match RequestType::from(h.request_type.to_native()) {
            RequestType::In => {
                let status = self.read_sectors(sector, writer);
                (status, writer.bytes_written() as u32)
            }
            RequestType::Out => (self.write_sectors(sector, reader), 0),
            RequestType::Flush => (
                if self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                },
                0,
            ),
            RequestType::GetId => {
                let n = writer.available_bytes().min(ID_BYTES);
                let ok = writer.write_all(&self.id[..n]).is_ok();
                (if ok { S_OK } else { S_IOERR }, n as u32)
            }
            RequestType::Discard => (self.discard(reader, false), 0),
            RequestType::WriteZeroes => (self.discard(reader, true), 0),
            RequestType::Unsupported(t) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                (S_UNSUPP, 0)
            }
        }
    }

    /// Byte offset of `sector` if `[sector, sector + len)` lies inside the
    /// disk and `len` is whole sectors.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then(|| sector * SECTOR_SIZE)
    }

    /// IN without a bounce buffer: the file is read into each writable
    /// buffer of the chain in turn (the last byte, the status, excluded).
    fn read_direct<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
        sector: u64,
        len: u64,
    ) -> Status {
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut left = len;
        for desc in chain.writable() {
            if left == 0 {
                break;
            }
            let n = u64::from(desc.len()).min(left);
            if self.file.seek(SeekFrom::Start(offset)).is_err()
                || mem
                    .read_exact_volatile_from(desc.addr(), &mut self.file, n as usize)
                    .is_err()
            {
                return S_IOERR;
            }
            offset += n;
            left -= n;
        }
        if left == 0 {
            S_OK
        } else {
            S_IOERR
        }
    }

    fn read_sectors<B: BitmapSlice>(&mut self, sector: u64, w: &mut Writer<'_, B>) -> Status {
        let len = w.available_bytes() as u64;
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = &mut self.buf[..n];
            if self.file.read_exact_at(buf, offset).is_err() || w.write_all(buf).is_err() {
                return S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        S_OK
    }

    fn write_sectors<B: BitmapSlice>(&mut self, sector: u64, r: &mut Reader<'_, B>) -> Status {
        if self.read_only {
            return S_IOERR;
        }
        let len = r.available_bytes() as u64;
        let Some(mut offset) = self.range(sector, len) else {
            return S_IOERR;
        };
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = &mut self.buf[..n];
            if r.read_exact(buf).is_err() || self.file.write_all_at(buf, offset).is_err() {
                return S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        S_OK
    }

    fn discard<B: BitmapSlice>(&mut self, r: &mut Reader<'_, B>, zeroes: bool) -> Status {
        if self.read_only {
            return S_IOERR;
        }
        let len = r.available_bytes();
        let seg_size = std::mem::size_of::<DiscardSegment>();
        if len == 0 || len % seg_size != 0 || len / seg_size > MAX_DISCARD_SEGMENTS as usize {
            return S_UNSUPP;
        }
        for _ in 0..len / seg_size {
            let Ok(seg) = r.read_obj::<DiscardSegment>() else {
                return S_IOERR;
            };
            let num = seg.num_sectors.to_native();
            let flags = seg.flags.to_native();
            if num > MAX_DISCARD_SECTORS || flags & !1 != 0 || (!zeroes && flags != 0) {
                return S_UNSUPP;
            }
            let Some(offset) = self.range(seg.sector.to_native(), u64::from(num) * SECTOR_SIZE)
            else {
                return S_IOERR;
            };
            let bytes = u64::from(num) * SECTOR_SIZE;
            if !self.punch(offset, bytes, zeroes) {
                return S_IOERR;
            }
        }
        S_OK
    }

    /// Deallocates (discard) or zeroes (write zeroes) a byte range, keeping
    /// the file size.
    fn punch(&mut self, offset: u64, len: u64, zeroes: bool) -> bool {
        if len == 0 {
            return true;
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return false;
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a file descriptor this struct owns; no memory
        // is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) } == 0 {
            return true;
        }
        if !zeroes {
            // Discard is a hint: a file system without hole punching may
            // ignore it.
            return true;
        }
        // No hole punching here: write the zeroes.
        self.buf[..CHUNK].fill(0);
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            if self.file.write_all_at(&self.buf[..n], at).is_err() {
                return false;
            }
            at += n as u64;
        }
        true
    }
}

/// A virtio-blk device over a raw image.
///
/// ```
/// use vmm_devices::virtio::block::Block;
/// use vmm_devices::virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
///
/// let file = tempfile_for_doc();
/// let disk: Block<GuestMemoryMmap> = Block::from_file(file, false, Some("disk0"))?;
/// assert_eq!(disk.capacity_sectors(), 8);
/// let mut capacity = [0u8; 8];
/// disk.read_config(0, &mut capacity);
/// assert_eq!(u64::from_le_bytes(capacity), 8);
/// # fn tempfile_for_doc() -> std::fs::File {
/// #     let path = std::env::temp_dir().join(format!("vmm-blk-doc-{}", std::process::id()));
/// #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
/// #     f.set_len(4096).unwrap();
/// #     std::fs::remove_file(&path).unwrap();
/// #     f
/// # }
/// # Ok::<(), vmm_devices::virtio::block::BlockError>(())
/// ```
pub struct Block<M> {
    backend: Backend,
    features: u64,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; 1],
    active: Option<ActivationContext<M>>,
}

impl<M> Block<M> {
    /// Opens `path` (read-only when `read_only`) as a disk with id `serial`.
    pub fn open(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Self, BlockError> {
        if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(BlockError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let ft = file.metadata().map_err(BlockError::Size)?.file_type();
        if !(ft.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&ft)) {
            return Err(BlockError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Self::from_file(file, read_only, serial)
    }

    /// A disk over an open file.
    pub fn from_file(
        file: File,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let serial = serial.unwrap_or("");
        if serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong {
                serial: serial.to_string(),
            });
        }
        let mut id = [0u8; ID_BYTES];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let size =
            std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(BlockError::Size)?;
        let capacity = size / SECTOR_SIZE;

        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &capacity.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Self {
            backend: Backend {
                file,
                read_only,
                id,
                capacity,
                buf: vec![0; CHUNK],
                broken_chains: 0,
            },
            features,
            config,
            queue_sizes: [BLOCK_QUEUE_SIZE],
            active: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.capacity
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.backend.read_only
    }

    /// Chains the device could not answer (no status byte, or buffers outside
    /// guest memory).
    pub fn broken_chains(&self) -> u64 {
        self.backend.broken_chains
    }
}

impl<M: GuestMemoryBackend + Send> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError> {
        self.active = Some(ctx.expect_queues(1)?);
        Ok(())
    }

    fn reset(&mut self) -> Option<ActivationContext<M>> {
        self.active.take()
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> &[virtio_queue::Queue] {
        self.active.as_ref().map_or(&[], |c| &c.queues)
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let Some(ctx) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = ctx.queues.get_mut(index) else {
            return false;
        };
        let backend = &mut self.backend;
        let mut broken = false;
        let budget = QueueBudget::for_queue(queue);
        let result = drain_queue(queue, &ctx.mem, ctx.interrupt.as_ref(), budget, |chain| {
            backend.handle(&ctx.mem, chain).unwrap_or_else(|| {
                broken = true;
                0
            })
        });
        backend.broken_chains += u64::from(broken);
        ctx.settle("virtio-blk", u64::from(broken), result)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
