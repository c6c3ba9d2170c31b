//! A host TAP device opened for virtio-net: no packet information prefix,
//! a 12-byte virtio-net header on every frame (`IFF_VNET_HDR`), non-blocking.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio-net header on every frame (`struct
/// virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `TUN_F_CSUM`: the guest takes frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: the guest takes TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: the guest takes TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`: ... with the ECN bit.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// `struct ifreq`, with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }
}

/// Why a TAP device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a NUL.
    #[error("bad TAP interface name {0:?}: 1 to 15 bytes, no NUL or '/'")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to attach to (or create) the interface.
    #[error("cannot attach to TAP interface {name}")]
    Attach {
        /// The interface.
        name: String,
        /// Why (EBUSY: another process has it; EPERM: not allowed).
        #[source]
        source: io::Error,
    },
    /// A file descriptor given as a TAP is not one.
    #[error("file descriptor {fd} is not a TAP device")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// What TUNGETIFF said.
        #[source]
        source: Option<io::Error>,
    },
    /// A TAP given by file descriptor was opened without `IFF_VNET_HDR` or
    /// with `IFF_NO_PI` missing.
    #[error(
        "TAP {name} was opened without IFF_VNET_HDR or without IFF_NO_PI; open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    WrongFlags {
        /// The interface.
        name: String,
    },
    /// Setting the header size, offloads or non-blocking mode failed.
    #[error("cannot set up TAP {name}: {what}")]
    Setup {
        /// The interface.
        name: String,
        /// What was being set.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A TAP device ready for virtio-net.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating it if the caller may
    /// and it does not exist; a persistent TAP made with `ip tuntap add` is
    /// the usual case).
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
        // is (40 bytes, the name NUL-terminated); the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.set_header_size()?;
        Ok(tap)
    }

    /// Takes a TAP the caller opened (and attached) itself, with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; on any
        // other kind of fd the kernel refuses the ioctl.
        let r = unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::NotTap {
                fd: raw,
                source: Some(io::Error::last_os_error()),
            });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::NotTap {
                fd: raw,
                source: None,
            });
        }
        if req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(TapError::WrongFlags { name });
        }
        let tap = Self {
            file: File::from(fd),
            name,
        };
        tap.fcntl_nonblock()?;
        tap.set_header_size()?;
        Ok(tap)
    }

    /// Takes a TAP by raw descriptor number (as inherited from a parent
    /// process).
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that nothing else owns.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: the caller promises `fd` is open and ours to own.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn setup_err(&self, what: &'static str) -> TapError {
        TapError::Setup {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn fcntl_nonblock(&self) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on our own fd, no pointers.
        let ok = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
        };
        if ok {
            Ok(())
        } else {
            Err(self.setup_err("non-blocking mode"))
        }
    }

    fn set_header_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(self.setup_err("virtio-net header size"));
        }
        Ok(())
    }

    /// The interface's MTU (asked through a socket of the calling
    /// thread's network namespace, which should be the TAP's).
    pub fn mtu(&self) -> io::Result<usize> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq::new();
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFMTU fills the int at the start of the union of one
        // `struct ifreq`, which `req` is.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mtu = i32::from_ne_bytes([
            req.flags.to_ne_bytes()[0],
            req.flags.to_ne_bytes()[1],
            req._pad[0],
            req._pad[1],
        ]);
        usize::try_from(mtu)
            .ok()
            .filter(|&m| (68..=65535).contains(&m))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// Tells the kernel which offloads the guest takes on the frames it
    /// receives (`TUN_F_*`); 0: none, every frame complete and checksummed.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(self.setup_err("offloads"));
        }
        Ok(())
    }

    /// Reads one frame (header first) into `iov`. `Ok(None)`: nothing
    /// waiting.
    ///
    /// # Safety
    ///
    /// Every entry of `iov` must point at memory writable for its length
    /// for the duration of the call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller vouches for the buffers; the count is bounded.
        let r = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), n) };
        match r {
            r if r >= 0 => Ok(Some(r as usize)),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Writes one frame (header first) gathered from `iov`. `Ok(false)`: the
    /// kernel would block.
    ///
    /// # Safety
    ///
    /// Every entry of `iov` must point at memory readable for its length
    /// for the duration of the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<bool> {
        let n = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller vouches for the buffers; the count is bounded.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), n) };
        match r {
            r if r >= 0 => Ok(true),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                e => Err(e),
            },
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "0123456789abcdef", "a/b", "a b", "a\0b"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(f)),
            Err(TapError::NotTap { .. })
        ));
    }
}
