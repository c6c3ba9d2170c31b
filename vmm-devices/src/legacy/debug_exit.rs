//! A debug-exit port: the guest writes a status byte and the VM ends with it.

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::persist::{Persist, RestoreError};

/// Default port (the one the test guest uses unless told otherwise).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The port accepts 1, 2 and 4-byte writes.
pub const DEBUG_EXIT_PORT_SIZE: u16 = 4;

/// Where a [`DebugExit`] sends the guest's status: the VMM turns it into a
/// typed event (its end of the run). Any `FnMut(u8) + Send` is one.
pub trait GuestExitSink: Send {
    /// The guest wrote `status`.
    fn guest_exit(&mut self, status: u8);
}

impl<F: FnMut(u8) + Send> GuestExitSink for F {
    fn guest_exit(&mut self, status: u8) {
        self(status)
    }
}

/// Records the first status written and hands it to its sink.
///
/// ```
/// use std::sync::mpsc::channel;
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
/// use vmm_devices::legacy::{DebugExit, DEBUG_EXIT_PORT};
///
/// let (tx, rx) = channel();
/// let mut dev = DebugExit::new(move |status| {
///     let _ = tx.send(status);
/// });
/// dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[3]);
/// dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[4]);
/// assert_eq!(dev.status(), Some(3));
/// assert_eq!(rx.try_iter().collect::<Vec<_>>(), [3], "the first status only");
/// ```
pub struct DebugExit<S: GuestExitSink> {
    sink: S,
    status: Option<u8>,
}

impl<S: GuestExitSink> DebugExit<S> {
    /// A port that hands the first status written to `sink`.
    pub fn new(sink: S) -> Self {
        Self { sink, status: None }
    }

    /// The status the guest wrote first, if it wrote one.
    pub fn status(&self) -> Option<u8> {
        self.status
    }
}

/// The saved state of a [`DebugExit`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugExitState {
    /// The status the guest wrote first, if it wrote one.
    pub status: Option<u8>,
}

impl<S: GuestExitSink> Persist for DebugExit<S> {
    type State = DebugExitState;
    type Args = S;
    type Error = RestoreError;

    fn save(&self) -> DebugExitState {
        DebugExitState {
            status: self.status,
        }
    }

    /// Any saved status is valid; the sink is not told again (the VM that
    /// heard it has ended).
    fn restore(sink: S, state: &DebugExitState) -> Result<Self, RestoreError> {
        Ok(Self {
            sink,
            status: state.status,
        })
    }
}

impl<S: GuestExitSink> MutDevicePio for DebugExit<S> {
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
            self.sink.guest_exit(data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    fn port() -> (DebugExit<impl GuestExitSink>, Receiver<u8>) {
        let (tx, rx) = channel();
        let dev = DebugExit::new(move |s| {
            let _ = tx.send(s);
        });
        (dev, rx)
    }

    #[test]
    fn first_status_wins_and_signals_once() {
        let (mut dev, rx) = port();
        assert_eq!(dev.status(), None);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[0x2a, 0, 0, 0]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[1]);
        assert_eq!(dev.status(), Some(0x2a));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0x2a]);
    }

    #[test]
    fn odd_widths_and_offsets_are_ignored() {
        let (mut dev, rx) = port();
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 1, &[1]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[1, 2, 3]);
        dev.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[]);
        assert_eq!(dev.status(), None);
        assert!(rx.try_recv().is_err());
        let mut buf = [0u8; 4];
        dev.pio_read(PioAddress(DEBUG_EXIT_PORT), 0, &mut buf);
        assert_eq!(buf, [0xff; 4]);
    }
}
