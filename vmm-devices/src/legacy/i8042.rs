//! The i8042 keyboard controller, present for the guest's reset request
//! (command 0xFE on port 0x64), on vm-superio.

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{I8042Device, Trigger};

use crate::persist::{Persist, RestoreError};

/// First port of the controller (data port 0x60; command/status port 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports 0x60-0x64.
pub const I8042_PORT_SIZE: u16 = 5;

/// An i8042 whose CPU-reset command signals `T`.
pub struct I8042<T: Trigger> {
    inner: I8042Device<T>,
    resets: u64,
}

impl<T: Trigger> I8042<T> {
    /// A controller that signals `reset` when the guest asks for a reset.
    pub fn new(reset: T) -> Self {
        Self {
            inner: I8042Device::new(reset),
            resets: 0,
        }
    }

    /// How many reset requests the guest made.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Reads port `I8042_PORT + offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    /// Writes port `I8042_PORT + offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if offset == 4 && value == 0xfe {
            self.resets += 1;
        }
        if let Err(e) = self.inner.write(offset, value) {
            log::warn!("i8042: cannot signal the reset request: {e:?}");
        }
    }
}

/// The saved state of an [`I8042`]: the controller itself keeps nothing
/// (vm-superio emulates only the reset command); the count of reset
/// requests is kept for inspection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Reset requests the guest made.
    pub resets: u64,
}

impl<T: Trigger> Persist for I8042<T> {
    type State = I8042State;
    type Args = T;
    type Error = RestoreError;

    fn save(&self) -> I8042State {
        I8042State {
            resets: self.resets,
        }
    }

    fn restore(reset: T, state: &I8042State) -> Result<Self, RestoreError> {
        Ok(Self {
            inner: I8042Device::new(reset),
            resets: state.resets,
        })
    }
}

impl<T: Trigger> MutDevicePio for I8042<T> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if off < I8042_PORT_SIZE as u8 => data[0] = self.read(off),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if off < I8042_PORT_SIZE as u8 {
                self.write(off, data[0]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;

    #[test]
    fn reset_command_on_the_command_port_signals_reset() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(t.try_clone().unwrap());
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xfe]);
        assert_eq!(t.eventfd().read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(t.try_clone().unwrap());
        dev.pio_write(PioAddress(I8042_PORT), 0, &[0xfe]); // data port
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xaa]); // self test
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xfe, 0]); // wide write
        assert!(t.eventfd().read().is_err());
        assert_eq!(dev.resets(), 0);
    }
}
