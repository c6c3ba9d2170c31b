//! The virtio-blk device.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ByteValued, Bytes, GuestMemoryBackend, Le16, Le32, Le64};

use super::request::{
    DiskGeometry, Request, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE,
};
use serde::{Deserialize, Serialize};

use crate::host_files::{lock_image, open_input, HostFileError, InputKind};
use crate::metrics::BlockMetrics;
use crate::persist::{Persist, RestoreError};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use crate::virtio::{
    read_config_bytes, Step, VirtioCommon, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (advertised as `seg_max`).
pub const SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Host bounce buffer: data moves between the file and guest memory in
/// chunks of this size.
const CHUNK: usize = 128 * 1024;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), up to
/// `write_zeroes_may_unmap`: packed, as the specification and Linux declare
/// it.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct BlockConfigSpace {
    /// Capacity in 512-byte sectors.
    pub capacity: Le64,
    /// Largest segment (unused: `VIRTIO_BLK_F_SIZE_MAX` is not offered).
    pub size_max: Le32,
    /// Most segments in a request.
    pub seg_max: Le32,
    /// Legacy geometry: cylinders, heads, sectors (unused).
    pub geometry: [u8; 4],
    /// Block size.
    pub blk_size: Le32,
    /// Topology: physical block exponent, alignment offset, minimum and
    /// optimal I/O size (unused).
    pub topology: [u8; 8],
    /// Cache mode (unused).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues.
    pub num_queues: Le16,
    /// Most sectors in one DISCARD segment.
    pub max_discard_sectors: Le32,
    /// Most DISCARD segments in one request.
    pub max_discard_seg: Le32,
    /// DISCARD alignment in sectors.
    pub discard_sector_alignment: Le32,
    /// Most sectors in one WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: Le32,
    /// Most WRITE_ZEROES segments in one request.
    pub max_write_zeroes_seg: Le32,
    /// Whether WRITE_ZEROES may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: a packed struct of little-endian integers and byte arrays (60
// bytes, no padding, checked below); every bit pattern is a valid value.
unsafe impl ByteValued for BlockConfigSpace {}

const _: () = assert!(std::mem::size_of::<BlockConfigSpace>() == 60);

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened, is not a file or block device, or is
    /// locked by another user.
    #[error(transparent)]
    Host(#[from] HostFileError),
    /// The image's size could not be read.
    #[error("cannot read the size of the disk image")]
    Size(#[source] io::Error),
    /// The rate limiter could not be made.
    #[error("cannot set up the rate limiter: {0}")]
    RateLimiter(String),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
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
    disk: DiskGeometry,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
    broken_chains: u64,
    metrics: Arc<BlockMetrics>,
    limiter: RateLimiter,
}

/// Why a request's I/O failed: the host (logged), or the guest's buffers.
enum HostIoError {
    Host(io::Error),
    Guest,
}

impl From<io::Error> for HostIoError {
    fn from(e: io::Error) -> Self {
        HostIoError::Host(e)
    }
}

/// How a request ended, for its status byte.
type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as u8;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as u8;

fn status(ok: bool) -> Status {
    if ok {
        S_OK
    } else {
        S_IOERR
    }
}

impl Backend {
    /// Handles one chain: parses the request, then executes it. Returns the
    /// bytes written into its device-writable buffers (data and status), or
    /// `None` if it has no status byte to write an answer to.
    fn handle<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Option<Step> {
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
        let readable = reader.available_bytes();
        let (status, written) = match Request::parse(&mut reader, readable, writable - 1, self.disk)
        {
            Ok(request) => {
                let bytes = match request {
                    Request::In { len, .. } | Request::Out { len, .. } => len,
                    _ => 0,
                };
                if !self.limiter.consume(bytes) {
                    // The limiter's timer brings the request back.
                    self.metrics.rate_limiter_throttled_events.inc();
                    return Some(Step::Later);
                }
                let kind = request;
                let (status, written) =
                    self.execute(request, mem, data_chain, &mut reader, &mut writer);
                self.count(&kind, status);
                (status, written)
            }
            Err(e) => {
                self.metrics.invalid_reqs_count.inc();
                (e.status(), 0)
            }
        };
        status_writer.write_all(&[status]).ok()?;
        Some(Step::Used(written + 1))
    }

    /// Counts a request the device executed.
    fn count(&self, request: &Request, status: Status) {
        let m = &self.metrics;
        if status != S_OK {
            m.execute_fails.inc();
            return;
        }
        match *request {
            Request::In { len, .. } => {
                m.read_count.inc();
                m.read_bytes.add(len);
            }
            Request::Out { len, .. } => {
                m.write_count.inc();
                m.write_bytes.add(len);
            }
            Request::Flush => m.flush_count.inc(),
            Request::GetId | Request::Discard { .. } => {}
        }
    }

    /// Executes a checked request; returns its status and the data bytes
    /// written for the driver.
    fn execute<M: GuestMemoryBackend, B: BitmapSlice>(
        &mut self,
        request: Request,
        mem: &M,
        chain: DescriptorChain<&M>,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> (Status, u32) {
        match request {
            Request::In { offset, len } => {
                let result = self.read_direct(mem, chain, offset, len);
                let ok = self.host(result, "read", offset, len);
                (status(ok), if ok { len as u32 } else { 0 })
            }
            Request::Out { offset, len } => {
                let result = self.write_from(reader, offset, len);
                (status(self.host(result, "write", offset, len)), 0)
            }
            Request::Flush => {
                let result = self.file.sync_data().map_err(HostIoError::Host);
                (status(self.host(result, "flush", 0, 0)), 0)
            }
            Request::GetId => {
                let n = writer.available_bytes().min(ID_BYTES);
                let ok = writer.write_all(&self.id[..n]).is_ok();
                (status(ok), n as u32)
            }
            Request::Discard {
                offset,
                len,
                zeroes,
            } => {
                let result = self.punch(offset, len, zeroes).map_err(HostIoError::Host);
                (status(self.host(result, "discard", offset, len)), 0)
            }
        }
    }

    /// Whether `result` went through; a host failure (ENOSPC, EIO, ...) is
    /// logged, rate limited: the guest gets IOERR, the operator a reason.
    fn host(&self, result: Result<(), HostIoError>, op: &str, offset: u64, len: u64) -> bool {
        match result {
            Ok(()) => true,
            Err(HostIoError::Host(e)) => {
                crate::host_warn!(
                    "virtio-blk: {op} of {len} bytes at byte {offset} of the image failed: {e}"
                );
                false
            }
            Err(HostIoError::Guest) => false,
        }
    }

    /// IN without a bounce buffer: the file is read into each writable
    /// buffer of the chain in turn (the last byte, the status, excluded).
    /// The chain's Writer has checked that every writable buffer lies in
    /// guest RAM.
    fn read_direct<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
        mut offset: u64,
        len: u64,
    ) -> Result<(), HostIoError> {
        let mut left = len;
        for desc in chain.writable() {
            if left == 0 {
                break;
            }
            let n = u64::from(desc.len()).min(left);
            self.file.seek(SeekFrom::Start(offset))?;
            mem.read_exact_volatile_from(desc.addr(), &mut self.file, n as usize)
                .map_err(|e| match e {
                    vm_memory::GuestMemoryError::IOError(io) => HostIoError::Host(io),
                    _ => HostIoError::Guest,
                })?;
            offset += n;
            left -= n;
        }
        if left == 0 {
            Ok(())
        } else {
            Err(HostIoError::Guest)
        }
    }

    fn write_from<B: BitmapSlice>(
        &mut self,
        r: &mut Reader<'_, B>,
        offset: u64,
        len: u64,
    ) -> Result<(), HostIoError> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            let buf = &mut self.buf[..n];
            r.read_exact(buf).map_err(|_| HostIoError::Guest)?;
            self.file.write_all_at(buf, at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Deallocates (discard) or zeroes (write zeroes) a byte range, keeping
    /// the file size.
    fn punch(&mut self, offset: u64, len: u64, zeroes: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a file descriptor this struct owns; no memory
        // is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) } == 0 {
            return Ok(());
        }
        if !zeroes {
            // Discard is a hint: a file system without hole punching may
            // ignore it.
            return Ok(());
        }
        // No hole punching here: write the zeroes.
        self.buf[..CHUNK].fill(0);
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            self.file.write_all_at(&self.buf[..n], at)?;
            at += n as u64;
        }
        Ok(())
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
    config: BlockConfigSpace,
    common: VirtioCommon<M>,
    /// Written when the device wants to come back to its queue.
    kick: EventFd,
}

impl<M> Block<M> {
    /// Opens `path` (read-only when `read_only`) as a disk with id `serial`,
    /// without blocking on a FIFO or device node, and, when `lock`, takes an
    /// OFD lock on the image (shared when read-only, exclusive otherwise) so
    /// that no other VMM writes it meanwhile.
    pub fn open(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
        lock: bool,
    ) -> Result<Self, BlockError> {
        let file = open_input("disk image", path, InputKind::FileOrBlockDevice, !read_only)?;
        if lock {
            lock_image(&file, path, read_only)?;
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
        let config = BlockConfigSpace {
            capacity: Le64::from(capacity),
            seg_max: Le32::from(SEG_MAX),
            blk_size: Le32::from(SECTOR_SIZE as u32),
            num_queues: Le16::from(1),
            max_discard_sectors: Le32::from(MAX_DISCARD_SECTORS),
            max_discard_seg: Le32::from(MAX_DISCARD_SEGMENTS),
            discard_sector_alignment: Le32::from(1),
            max_write_zeroes_sectors: Le32::from(MAX_DISCARD_SECTORS),
            max_write_zeroes_seg: Le32::from(MAX_DISCARD_SEGMENTS),
            write_zeroes_may_unmap: 1,
            ..BlockConfigSpace::default()
        };
        Ok(Self {
            backend: Backend {
                file,
                disk: DiskGeometry {
                    capacity,
                    read_only,
                },
                id,
                buf: vec![0; CHUNK],
                broken_chains: 0,
                metrics: Arc::default(),
                limiter: RateLimiter::new(&RateLimiterConfig::default())
                    .map_err(|e| BlockError::RateLimiter(e.to_string()))?,
            },
            kick: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            config,
            common: VirtioCommon::new(TYPE_BLOCK, features, &[BLOCK_QUEUE_SIZE]),
        })
    }

    /// Puts the disk on another image (opened as this disk was: read-only
    /// or not), keeping its id and features; the capacity becomes the new
    /// image's. Requests already answered stay answered; the next ones go
    /// to the new image. The transport should then announce the
    /// configuration change
    /// ([`MmioTransport::config_changed`](crate::virtio::mmio::MmioTransport::config_changed)).
    pub fn replace_file(&mut self, file: File) -> Result<(), BlockError> {
        let size =
            std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0)).map_err(BlockError::Size)?;
        let capacity = size / SECTOR_SIZE;
        self.backend.file = file;
        self.backend.disk.capacity = capacity;
        self.config.capacity = Le64::from(capacity);
        Ok(())
    }

    /// Sets new limits (bytes read or written, and requests), taking
    /// effect at once; a config with no buckets lifts them.
    pub fn set_rate_limiter(&mut self, config: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        self.backend.limiter.update(config)?;
        // Requests that were waiting may go.
        let _ = self.kick.write(1);
        Ok(())
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.disk.capacity
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.backend.disk.read_only
    }

    /// Chains the device could not answer (no status byte, or buffers outside
    /// guest memory).
    pub fn broken_chains(&self) -> u64 {
        self.backend.broken_chains
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.backend.metrics.clone()
    }
}

/// The saved state of a [`Block`] device: what the driver may have seen of
/// the disk. The image itself is the disk's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// The GET_ID string (at most 20 bytes).
    pub serial: String,
    /// Features offered.
    pub features: u64,
}

impl<M> Persist for Block<M> {
    type State = BlockState;
    /// The image, opened as the state says (read-only or not).
    type Args = File;
    type Error = RestoreError;

    fn save(&self) -> BlockState {
        let id_len = self
            .backend
            .id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ID_BYTES);
        BlockState {
            capacity_sectors: self.backend.disk.capacity,
            read_only: self.backend.disk.read_only,
            serial: String::from_utf8_lossy(&self.backend.id[..id_len]).into_owned(),
            features: self.common.features(),
        }
    }

    /// Refuses an image whose size is not the saved capacity (the guest
    /// would find its disk changed under it) and features this build would
    /// not offer.
    fn restore(file: File, state: &BlockState) -> Result<Self, RestoreError> {
        let disk = Self::from_file(file, state.read_only, Some(&state.serial))
            .map_err(|e| RestoreError::Setup(Box::new(e)))?;
        if disk.capacity_sectors() != state.capacity_sectors {
            return Err(RestoreError::mismatch(
                "disk capacity in sectors",
                state.capacity_sectors,
                disk.capacity_sectors(),
            ));
        }
        if disk.common.features() != state.features {
            return Err(RestoreError::mismatch(
                "disk features",
                format!("{:#x}", state.features),
                format!("{:#x}", disk.common.features()),
            ));
        }
        Ok(disk)
    }
}

impl<M: GuestMemoryBackend + Send + 'static> VirtioDevice<M> for Block<M> {
    fn common(&self) -> &VirtioCommon<M> {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon<M> {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.backend.disk.read_only {
            return Ok(());
        }
        self.backend.file.sync_data()
    }

    fn save_device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(Persist::save(self)).ok()
    }

    /// Refuses a disk that is not the one saved: another capacity, read-only
    /// flag, id or feature set.
    fn restore_device_state(
        &mut self,
        state: Option<&serde_json::Value>,
    ) -> Result<(), RestoreError> {
        let saved: BlockState = crate::virtio::decode_device_state("virtio-blk", state)?;
        let here = Persist::save(self);
        let check = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            let (a, b) = (format!("{a:?}"), format!("{b:?}"));
            if a == b {
                Ok(())
            } else {
                Err(RestoreError::mismatch(format!("disk {what}"), a, b))
            }
        };
        check(
            "capacity in sectors",
            &saved.capacity_sectors,
            &here.capacity_sectors,
        )?;
        check("read-only flag", &saved.read_only, &here.read_only)?;
        check("id", &saved.serial, &here.serial)?;
        check("features", &saved.features, &here.features)
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let backend = &mut self.backend;
        if backend.limiter.is_blocked() {
            // The limiter's timer brings the device back.
            return false;
        }
        let done = self
            .common
            .drain_until(index, "virtio-blk", |mem, chain| backend.handle(mem, chain));
        backend.broken_chains += done.broken_chains;
        backend.metrics.queue_event_count.inc();
        backend.metrics.event_fails.add(done.broken_chains);
        done.more
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.backend.limiter.timer_fd(), self.kick.as_raw_fd()]
    }

    fn process_event(&mut self, index: usize) {
        match index {
            0 => self.backend.limiter.timer_fired(),
            _ => {
                let _ = self.kick.read();
            }
        }
        if self.is_active() && self.process_queue(0) {
            let _ = self.kick.write(1);
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
