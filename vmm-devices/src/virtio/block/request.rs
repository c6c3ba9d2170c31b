//! The virtio-blk request header and types.

use vm_memory::{ByteValued, Le32, Le64};

/// `struct virtio_blk_outhdr`: the 16 bytes that start every request.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: Le32,
    /// Reserved (formerly the I/O priority).
    pub reserved: Le32,
    /// First 512-byte sector.
    pub sector: Le64,
}

// SAFETY: three little-endian integers with no padding (4 + 4 + 8 bytes at
// offsets 0, 4, 8); every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`: one DISCARD/WRITE_ZEROES segment.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: Le64,
    /// Number of sectors.
    pub num_sectors: Le32,
    /// Bit 0: unmap (WRITE_ZEROES only); other bits reserved.
    pub flags: Le32,
}

// SAFETY: little-endian integers at offsets 0, 8, 12, 16 bytes in all, no
// padding; every bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// The request types this device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Read the device id string.
    GetId,
    /// Deallocate sectors.
    Discard,
    /// Zero sectors.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(v: u32) -> Self {
        use virtio_bindings::virtio_blk::*;
        match v {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}
