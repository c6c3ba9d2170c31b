//! virtio-blk on a raw image file (virtio 1.2, 5.2).
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES. The capacity is
//! the file size in 512-byte sectors; requests past it, misaligned lengths and
//! writes to a read-only disk get `VIRTIO_BLK_S_IOERR` and leave the file
//! untouched. FLUSH reaches the disk (fdatasync) before its used entry is
//! published. Data moves through a bounded host buffer in chunks.

mod device;
mod request;

pub use device::{Block, BlockConfigSpace, BlockError, BlockState, BLOCK_QUEUE_SIZE, SEG_MAX};
pub use request::{
    DiscardSegment, DiskGeometry, Request, RequestError, RequestHeader, RequestType,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE,
};
