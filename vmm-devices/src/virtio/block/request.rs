//! virtio-blk requests: the wire structures, and a request parsed and
//! checked against the disk before any I/O is done.

use std::io::Read;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{ByteValued, Le32, Le64};

/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

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

/// What a request's checks need to know of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl DiskGeometry {
    /// Byte offset of `sector` if `[sector, sector + len)` lies inside the
    /// disk and `len` is whole sectors.
    pub fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then(|| sector * SECTOR_SIZE)
    }
}

/// Why a request is answered without I/O: the status byte it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Past the capacity, misaligned, a write to a read-only disk, or an
    /// unreadable header or segment: `VIRTIO_BLK_S_IOERR`.
    #[error("request refused (I/O error)")]
    IoErr,
    /// A type or segment form this device does not serve:
    /// `VIRTIO_BLK_S_UNSUPP`.
    #[error("request not supported")]
    Unsupported,
}

impl RequestError {
    /// The status byte the driver reads.
    pub fn status(self) -> u8 {
        match self {
            RequestError::IoErr => VIRTIO_BLK_S_IOERR as u8,
            RequestError::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// A request, parsed and checked: every range is inside the disk and whole
/// sectors, writes are to a writable disk. Executing it cannot go outside
/// what it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` into the device-writable buffers.
    In {
        /// Byte offset in the image.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write the `len` bytes that follow the header at byte `offset`.
    Out {
        /// Byte offset in the image.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make written data durable.
    Flush,
    /// Write the id string into the device-writable buffers.
    GetId,
    /// Deallocate (`zeroes` false) or zero (`zeroes` true) `len` bytes at
    /// byte `offset`.
    Discard {
        /// Byte offset in the image.
        offset: u64,
        /// Bytes.
        len: u64,
        /// WRITE_ZEROES rather than DISCARD.
        zeroes: bool,
    },
}

impl Request {
    /// Parses a request from `body` (the driver-readable bytes of the chain,
    /// header first), given `writable` data bytes before the status byte,
    /// and checks it against `disk`.
    pub fn parse<R: Read>(
        body: &mut R,
        readable: usize,
        writable: usize,
        disk: DiskGeometry,
    ) -> Result<Self, RequestError> {
        let header: RequestHeader = read_obj(body)?;
        let payload = readable
            .checked_sub(std::mem::size_of::<RequestHeader>())
            .ok_or(RequestError::IoErr)?;
        let sector = header.sector.to_native();
        let writes = |len: u64| -> Result<u64, RequestError> {
            if disk.read_only {
                return Err(RequestError::IoErr);
            }
            disk.byte_range(sector, len).ok_or(RequestError::IoErr)
        };
        match RequestType::from(header.request_type.to_native()) {
            RequestType::In => {
                let len = writable as u64;
                let offset = disk.byte_range(sector, len).ok_or(RequestError::IoErr)?;
                Ok(Request::In { offset, len })
            }
            RequestType::Out => {
                let len = payload as u64;
                Ok(Request::Out {
                    offset: writes(len)?,
                    len,
                })
            }
            RequestType::Flush => Ok(Request::Flush),
            RequestType::GetId => Ok(Request::GetId),
            t @ (RequestType::Discard | RequestType::WriteZeroes) => {
                let zeroes = t == RequestType::WriteZeroes;
                if disk.read_only {
                    return Err(RequestError::IoErr);
                }
                let seg_size = std::mem::size_of::<DiscardSegment>();
                if payload == 0
                    || payload % seg_size != 0
                    || payload / seg_size > MAX_DISCARD_SEGMENTS as usize
                {
                    return Err(RequestError::Unsupported);
                }
                let seg: DiscardSegment = read_obj(body)?;
                let num = seg.num_sectors.to_native();
                let flags = seg.flags.to_native();
                if num > MAX_DISCARD_SECTORS || flags & !1 != 0 || (!zeroes && flags != 0) {
                    return Err(RequestError::Unsupported);
                }
                let len = u64::from(num) * SECTOR_SIZE;
                let offset = disk
                    .byte_range(seg.sector.to_native(), len)
                    .ok_or(RequestError::IoErr)?;
                Ok(Request::Discard {
                    offset,
                    len,
                    zeroes,
                })
            }
            RequestType::Unsupported(t) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                Err(RequestError::Unsupported)
            }
        }
    }
}

fn read_obj<T: ByteValued + Default, R: Read>(r: &mut R) -> Result<T, RequestError> {
    let mut v = T::default();
    r.read_exact(v.as_mut_slice())
        .map_err(|_| RequestError::IoErr)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::*;

    const DISK: DiskGeometry = DiskGeometry {
        capacity: 64,
        read_only: false,
    };

    fn body(t: u32, sector: u64, payload: &[u8]) -> Vec<u8> {
        let h = RequestHeader {
            request_type: Le32::from(t),
            reserved: Le32::from(0),
            sector: Le64::from(sector),
        };
        let mut v = h.as_slice().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn parse(b: &[u8], writable: usize, disk: DiskGeometry) -> Result<Request, RequestError> {
        Request::parse(&mut &b[..], b.len(), writable, disk)
    }

    #[test]
    fn reads_and_writes_are_checked_against_capacity_and_alignment() {
        let b = body(VIRTIO_BLK_T_IN, 2, &[]);
        assert_eq!(
            parse(&b, 1024, DISK),
            Ok(Request::In {
                offset: 1024,
                len: 1024
            })
        );
        assert_eq!(parse(&b, 1000, DISK), Err(RequestError::IoErr));
        let b = body(VIRTIO_BLK_T_IN, 63, &[]);
        assert_eq!(parse(&b, 1024, DISK), Err(RequestError::IoErr));
        let b = body(VIRTIO_BLK_T_IN, u64::MAX, &[]);
        assert_eq!(parse(&b, 512, DISK), Err(RequestError::IoErr));
        let b = body(VIRTIO_BLK_T_OUT, 1, &[0; 512]);
        assert_eq!(
            parse(&b, 0, DISK),
            Ok(Request::Out {
                offset: 512,
                len: 512
            })
        );
        let ro = DiskGeometry {
            read_only: true,
            ..DISK
        };
        assert_eq!(parse(&b, 0, ro), Err(RequestError::IoErr));
    }

    #[test]
    fn short_headers_and_unknown_types_are_refused() {
        assert_eq!(parse(&[0; 8], 1, DISK), Err(RequestError::IoErr));
        let b = body(99, 0, &[]);
        assert_eq!(parse(&b, 0, DISK), Err(RequestError::Unsupported));
    }

    #[test]
    fn discard_segments_are_bounded() {
        let seg = |sector: u64, n: u32, flags: u32| {
            DiscardSegment {
                sector: Le64::from(sector),
                num_sectors: Le32::from(n),
                flags: Le32::from(flags),
            }
            .as_slice()
            .to_vec()
        };
        let b = body(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(4, 2, 1));
        assert_eq!(
            parse(&b, 0, DISK),
            Ok(Request::Discard {
                offset: 2048,
                len: 1024,
                zeroes: true
            })
        );
        let b = body(VIRTIO_BLK_T_DISCARD, 0, &seg(4, 2, 1));
        assert_eq!(parse(&b, 0, DISK), Err(RequestError::Unsupported));
        let mut two = seg(0, 1, 0);
        two.extend(seg(1, 1, 0));
        let b = body(VIRTIO_BLK_T_DISCARD, 0, &two);
        assert_eq!(parse(&b, 0, DISK), Err(RequestError::Unsupported));
        let b = body(VIRTIO_BLK_T_DISCARD, 0, &seg(63, 2, 0));
        assert_eq!(parse(&b, 0, DISK), Err(RequestError::IoErr));
    }
}
