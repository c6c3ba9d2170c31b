//! The VM generation port: what a guest reads to learn that it was restored
//! from a snapshot, and which copy it is.
//!
//! Sixteen read-only bytes, little endian: a counter (0 at cold boot, one
//! more at each restore) and an identity (random, new at each boot and each
//! restore). Two clones restored from one snapshot read the same counter
//! and different identities; a guest that caches something it must not
//! share with its clones (random seeds, addresses, tokens) rereads the
//! port and starts over when either has changed.

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::persist::{Persist, RestoreError};

/// The port of the generation device.
pub const GENERATION_PORT: u16 = 0x5a0;
/// Its size: a 64-bit counter then a 64-bit identity.
pub const GENERATION_PORT_SIZE: u16 = 16;

/// The generation device.
///
/// ```
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
/// use vmm_devices::legacy::{VmGeneration, GENERATION_PORT};
/// use vmm_devices::persist::Persist;
///
/// let booted = VmGeneration::new(0xfeed);
/// let restored = VmGeneration::restore(0xbeef, &booted.save())?;
/// let mut r = restored;
/// let mut counter = [0u8; 8];
/// r.pio_read(PioAddress(GENERATION_PORT), 0, &mut counter);
/// assert_eq!(u64::from_le_bytes(counter), 1);
/// assert_eq!(r.identity(), 0xbeef);
/// # Ok::<(), vmm_devices::persist::RestoreError>(())
/// ```
#[derive(Debug)]
pub struct VmGeneration {
    counter: u64,
    identity: u64,
}

/// The saved state of a [`VmGeneration`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGenerationState {
    /// Restores so far.
    pub counter: u64,
    /// The identity when the state was saved.
    pub identity: u64,
}

impl VmGeneration {
    /// A freshly booted VM's: counter 0, the given identity.
    pub fn new(identity: u64) -> Self {
        Self {
            counter: 0,
            identity,
        }
    }

    /// Restores so far.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// This copy's identity.
    pub fn identity(&self) -> u64 {
        self.identity
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.counter.to_le_bytes());
        b[8..].copy_from_slice(&self.identity.to_le_bytes());
        b
    }
}

impl Persist for VmGeneration {
    type State = VmGenerationState;
    /// The restored copy's new identity.
    type Args = u64;
    type Error = RestoreError;

    fn save(&self) -> VmGenerationState {
        VmGenerationState {
            counter: self.counter,
            identity: self.identity,
        }
    }

    /// The counter moves on by one; the identity is the new one.
    fn restore(identity: u64, state: &VmGenerationState) -> Result<Self, RestoreError> {
        let counter = state
            .counter
            .checked_add(1)
            .ok_or_else(|| RestoreError::invalid("generation counter", "at its maximum"))?;
        Ok(Self { counter, identity })
    }
}

impl MutDevicePio for VmGeneration {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let bytes = self.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::from(offset)
                .checked_add(i)
                .and_then(|at| bytes.get(at))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_writes_change_nothing() {
        let mut g = VmGeneration::new(0x1122_3344_5566_7788);
        g.pio_write(PioAddress(GENERATION_PORT), 0, &[1, 2, 3, 4]);
        let mut id = [0u8; 4];
        g.pio_read(PioAddress(GENERATION_PORT), 8, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x5566_7788);
        let mut past = [0u8; 4];
        g.pio_read(PioAddress(GENERATION_PORT), 14, &mut past);
        assert_eq!(past, [0x22, 0x11, 0xff, 0xff]);
        assert_eq!(g.counter(), 0);
    }

    #[test]
    fn a_counter_at_its_maximum_is_refused() {
        let st = VmGenerationState {
            counter: u64::MAX,
            identity: 1,
        };
        assert!(VmGeneration::restore(2, &st).is_err());
    }
}
