//! virtio-net (virtio 1.2, 5.1) on a host TAP device.
//!
//! One receive and one transmit queue. Frames move between the TAP and
//! guest buffers with `readv`/`writev` straight from and into guest memory
//! (the 12-byte virtio-net header travels with each frame, so the TAP does
//! the checksum and segmentation offloads the guest negotiated). Receive
//! never drops a frame the guest has room for: when the guest has posted
//! less than a largest frame's worth of buffers, the next frame is read
//! into the device's own buffer and held until it fits. The TAP is watched
//! edge-triggered, so a guest without buffers never makes the device spin;
//! its next receive notification resumes reading. Each direction has a
//! [`RateLimiter`](crate::rate_limiter::RateLimiter), resumed by its timer.
//!
//! ```no_run
//! use vm_memory::GuestMemoryMmap;
//! use vmm_devices::virtio::net::{MacAddr, Net, Tap};
//!
//! let tap = Tap::open("tap0")?;
//! let mac: MacAddr = "06:00:ac:10:00:02".parse()?;
//! let net: Net<GuestMemoryMmap> = Net::new(tap, Some(mac))?;
//! assert_eq!(net.mac(), Some(mac));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod device;
mod tap;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use device::{Net, NetError, NetState, MAX_FRAME, NET_QUEUE_SIZE};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// An Ethernet MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacAddrError {
    /// Not six hexadecimal bytes separated by colons.
    #[error("bad MAC address {0:?}: expected six hex bytes like 06:00:ac:10:00:02")]
    Syntax(String),
    /// A group (multicast) address cannot be a NIC's own.
    #[error("MAC address {0} is a multicast address; a NIC needs a unicast one")]
    Multicast(String),
}

impl MacAddr {
    /// A locally administered unicast address from `seed` bytes
    /// (`x2:...`), as a VMM picks one for a NIC given none.
    pub fn local(seed: [u8; 5]) -> Self {
        Self([0x06, seed[0], seed[1], seed[2], seed[3], seed[4]])
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacAddrError::Syntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(MacAddrError::Multicast(s.to_string()));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
