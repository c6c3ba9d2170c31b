//! The Bochs/QEMU debug console: every byte written to port 0xE9 goes to a
//! host `Write`. Reading the port gives 0xE9, as on those machines, so a
//! guest can detect it.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::persist::{Persist, RestoreError};

/// The debug console's port.
pub const DEBUGCON_PORT: u16 = 0xe9;

/// A debug console writing to `W`.
pub struct DebugCon<W: Write> {
    out: W,
}

impl<W: Write> DebugCon<W> {
    /// A console writing to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// The output.
    pub fn output(&self) -> &W {
        &self.out
    }
}

/// The saved state of a [`DebugCon`]: it holds none (each byte goes out as
/// it is written), so any saved state restores.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConState {}

impl<W: Write> Persist for DebugCon<W> {
    type State = DebugConState;
    type Args = W;
    type Error = RestoreError;

    fn save(&self) -> DebugConState {
        DebugConState {}
    }

    fn restore(out: W, _state: &DebugConState) -> Result<Self, RestoreError> {
        Ok(Self::new(out))
    }
}

impl<W: Write> MutDevicePio for DebugCon<W> {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(DEBUGCON_PORT as u8);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 && data.len() == 1 {
            let _ = self.out.write_all(data);
            let _ = self.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_output_and_reads_identify_the_port() {
        let mut d = DebugCon::new(Vec::new());
        d.pio_write(PioAddress(DEBUGCON_PORT), 0, b"!");
        d.pio_write(PioAddress(DEBUGCON_PORT), 0, b"ab"); // wide writes are ignored
        assert_eq!(d.output(), b"!");
        let mut r = [0u8; 1];
        d.pio_read(PioAddress(DEBUGCON_PORT), 0, &mut r);
        assert_eq!(r, [0xe9]);
    }
}
