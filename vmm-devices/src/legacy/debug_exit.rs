//! A debug-exit port: the guest writes a status byte and the VM ends with it.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::Trigger;

/// Default port (the one the test guest uses unless told otherwise).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The port accepts 1, 2 and 4-byte writes.
pub const DEBUG_EXIT_PORT_SIZE: u16 = 4;

/// Records the first status written and signals `T`.
///
/// ```
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
/// use vmm_devices::legacy::{DebugExit, DEBUG_EXIT_PORT};
/// use vmm_devices::EventFdTrigger;
///
/// let exit_evt = EventFdTrigger::new()?;
/// let mut dev = DebugExit::new(exit_evt.try_clone()?);
/// dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[3]);
/// assert_eq!(dev.status(), Some(3));
/// assert_eq!(exit_evt.eventfd().read()?, 1);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct DebugExit<T: Trigger> {
    exit: T,
    status: Option<u8>,
}

impl<T: Trigger> DebugExit<T> {
    /// A port that signals `exit` when written.
    pub fn new(exit: T) -> Self {
        Self { exit, status: None }
    }

    /// The status the guest wrote first, if it wrote one.
    pub fn status(&self) -> Option<u8> {
        self.status
    }
}

impl<T: Trigger> MutDevicePio for DebugExit<T> {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            log::debug!(
                "debug-exit: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        if self.status.is_none() {
            self.status = Some(data[0]);
            if let Err(e) = self.exit.trigger() {
                log::error!("debug-exit: cannot signal the exit: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;

    #[test]
    fn first_status_wins_and_signals_once() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = DebugExit::new(t.try_clone().unwrap());
        assert_eq!(dev.status(), None);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[0x2a, 0, 0, 0]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[1]);
        assert_eq!(dev.status(), Some(0x2a));
        assert_eq!(t.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn odd_widths_and_offsets_are_ignored() {
        let t = EventFdTrigger::new().unwrap();
        let mut dev = DebugExit::new(t.try_clone().unwrap());
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 1, &[1]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[1, 2, 3]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[]);
        assert_eq!(dev.status(), None);
        assert!(t.eventfd().read().is_err());
        let mut buf = [0u8; 4];
        dev.pio_read(PioAddress(DEBUG_EXIT_PORT), 0, &mut buf);
        assert_eq!(buf, [0xff; 4]);
    }
}
