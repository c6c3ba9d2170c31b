//! The i8042 keyboard controller with a keyboard behind it: enough of both
//! for a guest's driver to find them (self tests, command byte, keyboard
//! reset and identify), for the host to press Ctrl-Alt-Del (what an
//! orchestrator's graceful stop sends), and for the guest's reset request
//! (command 0xFE on port 0x64). There is no mouse (AUX) port.
//!
//! ```
//! use vmm_devices::legacy::I8042;
//! use vmm_devices::EventFdTrigger;
//!
//! let reset = EventFdTrigger::new()?;
//! let irq = EventFdTrigger::new()?;
//! let mut kbd = I8042::new(reset, irq.try_clone()?);
//! kbd.write(0, 0xff); // the guest resets the keyboard
//! assert_eq!((kbd.read(0), kbd.read(0)), (0xfa, 0xaa)); // ACK, self test passed
//! kbd.press_ctrl_alt_del()?;
//! assert_eq!(kbd.read(4) & 1, 1, "scancodes wait in the output buffer");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::Trigger;

use crate::persist::{Persist, RestoreError};

/// First port of the controller (data port 0x60; command/status port 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports 0x60-0x64.
pub const I8042_PORT_SIZE: u16 = 5;
/// The keyboard's interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;
/// Bytes the output buffer holds (keys pressed while the guest does not
/// read wait here; more are refused).
pub const I8042_BUFFER_SIZE: usize = 16;

const DATA: u8 = 0;
const COMMAND: u8 = 4;

/// Status: output buffer full.
const SB_OUT_FULL: u8 = 0x01;
/// Status: the controller passed its self test (system flag).
const SB_SYSTEM: u8 = 0x04;
/// Status: the last write was a command.
const SB_COMMAND: u8 = 0x08;
/// Status: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

/// Command byte: keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// Command byte: system flag.
const CB_SYSTEM: u8 = 0x04;
/// Command byte: keyboard disabled.
const CB_KBD_DISABLED: u8 = 0x10;
/// Command byte: AUX disabled.
const CB_AUX_DISABLED: u8 = 0x20;
/// Command byte: scancodes translated to set 1.
const CB_TRANSLATE: u8 = 0x40;

const ACK: u8 = 0xfa;

/// Why a key could not be pressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The guest has not read the keys pressed before.
    #[error("the i8042 output buffer is full: the guest is not reading its keyboard")]
    BufferFull,
}

/// An i8042 whose reset request signals `R` and whose keyboard interrupt
/// is `I`.
pub struct I8042<R: Trigger, I: Trigger> {
    reset: R,
    irq: I,
    state: I8042State,
}

impl<R: Trigger, I: Trigger> I8042<R, I> {
    /// A controller after power-on: keyboard enabled and interrupting,
    /// translation to scancode set 1 on.
    pub fn new(reset: R, irq: I) -> Self {
        Self {
            reset,
            irq,
            state: I8042State::default(),
        }
    }

    /// How many reset requests the guest made.
    pub fn resets(&self) -> u64 {
        self.state.resets
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), KeyError> {
        let out = &mut self.state.output;
        if out.len() + bytes.len() > I8042_BUFFER_SIZE {
            return Err(KeyError::BufferFull);
        }
        let was_empty = out.is_empty();
        out.extend(bytes);
        if was_empty {
            self.interrupt();
        }
        Ok(())
    }

    /// A controller or keyboard answer; dropped when the guest floods the
    /// buffer with commands it never reads the answers of.
    fn answer(&mut self, bytes: &[u8]) {
        if self.push(bytes).is_err() {
            log::debug!("i8042: output buffer full, answer dropped");
        }
    }

    fn interrupt(&mut self) {
        if self.state.command_byte & CB_KBD_INT != 0 {
            if let Err(e) = self.irq.trigger() {
                log::warn!("i8042: cannot raise the keyboard interrupt: {e:?}");
            }
        }
    }

    /// Presses and releases Ctrl, Alt and Delete, in the scancode set the
    /// guest reads (set 1 when translation is on, set 2 otherwise).
    pub fn press_ctrl_alt_del(&mut self) -> Result<(), KeyError> {
        // Make Ctrl, Alt, Delete; break Delete, Alt, Ctrl. Set 1 breaks
        // are the make code with bit 7 set, set 2 breaks are F0 prefixed.
        const SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
        const SET2: [u8; 11] = [
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        if self.state.command_byte & CB_TRANSLATE != 0 {
            self.push(&SET1)
        } else {
            self.push(&SET2)
        }
    }

    /// Reads port `I8042_PORT + offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => {
                let byte = self
                    .state
                    .output
                    .pop_front()
                    .unwrap_or(self.state.last_read);
                self.state.last_read = byte;
                if !self.state.output.is_empty() {
                    self.interrupt();
                }
                byte
            }
            COMMAND => {
                let mut status = self.state.status & (SB_SYSTEM | SB_COMMAND);
                if !self.state.output.is_empty() {
                    status |= SB_OUT_FULL;
                }
                if self.state.command_byte & CB_KBD_DISABLED == 0 {
                    status |= SB_KBD_ENABLED;
                }
                status
            }
            _ => 0xff,
        }
    }

    /// Writes port `I8042_PORT + offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        match offset {
            COMMAND => {
                self.state.status |= SB_COMMAND;
                self.command(value);
            }
            DATA => {
                self.state.status &= !SB_COMMAND;
                match self.state.pending_command.take() {
                    Some(cmd) => self.command_data(cmd, value),
                    None => self.keyboard(value),
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, cmd: u8) {
        self.state.pending_command = None;
        match cmd {
            0x20 => {
                let cb = self.state.command_byte;
                self.answer(&[cb]);
            }
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.state.pending_command = Some(cmd),
            0xa7 => self.state.command_byte |= CB_AUX_DISABLED,
            0xa8 => self.state.command_byte &= !CB_AUX_DISABLED,
            // AUX interface test: clock line stuck low (no mouse port).
            0xa9 => self.answer(&[0x01]),
            0xaa => {
                self.state.status |= SB_SYSTEM;
                self.answer(&[0x55]);
            }
            0xab => self.answer(&[0x00]),
            0xad => self.state.command_byte |= CB_KBD_DISABLED,
            0xae => self.state.command_byte &= !CB_KBD_DISABLED,
            0xc0 => self.answer(&[0x00]),
            0xd0 => {
                let port = self.state.output_port;
                self.answer(&[port]);
            }
            0xfe => {
                self.state.resets += 1;
                if let Err(e) = self.reset.trigger() {
                    log::warn!("i8042: cannot signal the reset request: {e:?}");
                }
            }
            _ => {}
        }
    }

    fn command_data(&mut self, cmd: u8, value: u8) {
        match cmd {
            0x60 => {
                self.state.command_byte = value;
                if value & CB_SYSTEM != 0 {
                    self.state.status |= SB_SYSTEM;
                }
            }
            0xd1 => self.state.output_port = value,
            0xd2 => self.answer(&[value]),
            // Writes to the AUX port: there is no mouse to answer.
            _ => {}
        }
    }

    fn keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.state.pending_key_command.take() {
            self.answer(&[ACK]);
            // Get scancode set (F0 00): set 2.
            if cmd == 0xf0 && value == 0 {
                self.answer(&[0x02]);
            }
            return;
        }
        match value {
            0xff => {
                self.state.output.clear();
                self.answer(&[ACK, 0xaa]);
            }
            0xf2 => {
                let id = if self.state.command_byte & CB_TRANSLATE != 0 {
                    0x41
                } else {
                    0x83
                };
                self.answer(&[ACK, 0xab, id]);
            }
            0xee => self.answer(&[0xee]),
            0xed | 0xf0 | 0xf3 => {
                self.state.pending_key_command = Some(value);
                self.answer(&[ACK]);
            }
            _ => self.answer(&[ACK]),
        }
    }
}

/// The saved state of an [`I8042`]. Every field has a default, so states
/// saved before a field existed still restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct I8042State {
    /// Reset requests the guest made.
    pub resets: u64,
    /// The command byte.
    pub command_byte: u8,
    /// Status bits the guest set (system flag, last write a command).
    pub status: u8,
    /// The output port (written with command 0xD1).
    pub output_port: u8,
    /// Bytes waiting for the guest, oldest first (at most
    /// [`I8042_BUFFER_SIZE`]).
    pub output: VecDeque<u8>,
    /// The byte the guest read last (read again from an empty buffer).
    pub last_read: u8,
    /// A controller command waiting for its data byte.
    pub pending_command: Option<u8>,
    /// A keyboard command waiting for its argument.
    pub pending_key_command: Option<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            resets: 0,
            command_byte: CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE,
            status: SB_SYSTEM,
            output_port: 0x01,
            output: VecDeque::new(),
            last_read: 0,
            pending_command: None,
            pending_key_command: None,
        }
    }
}

impl<R: Trigger, I: Trigger> Persist for I8042<R, I> {
    type State = I8042State;
    type Args = (R, I);
    type Error = RestoreError;

    fn save(&self) -> I8042State {
        self.state.clone()
    }

    fn restore((reset, irq): (R, I), state: &I8042State) -> Result<Self, RestoreError> {
        if state.output.len() > I8042_BUFFER_SIZE {
            return Err(RestoreError::invalid(
                "i8042 output buffer",
                format!("{} bytes, at most {I8042_BUFFER_SIZE}", state.output.len()),
            ));
        }
        Ok(Self {
            reset,
            irq,
            state: state.clone(),
        })
    }
}

impl<R: Trigger, I: Trigger> MutDevicePio for I8042<R, I> {
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

    fn dev() -> (
        I8042<EventFdTrigger, EventFdTrigger>,
        EventFdTrigger,
        EventFdTrigger,
    ) {
        let reset = EventFdTrigger::new().unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let d = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (d, reset, irq)
    }

    #[test]
    fn reset_command_on_the_command_port_signals_reset() {
        let (mut dev, t, _) = dev();
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xfe]);
        assert_eq!(t.eventfd().read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (mut dev, t, _) = dev();
        dev.pio_write(PioAddress(I8042_PORT), 0, &[0xfe]); // data port
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xaa]); // self test
        dev.pio_write(PioAddress(I8042_PORT), 4, &[0xfe, 0]); // wide write
        assert!(t.eventfd().read().is_err());
        assert_eq!(dev.resets(), 0);
    }

    #[test]
    fn a_driver_probe_sees_a_controller_and_a_keyboard() {
        let (mut d, _, irq) = dev();
        d.write(COMMAND, 0xaa);
        assert_eq!(d.read(COMMAND) & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(d.read(DATA), 0x55, "controller self test");
        assert_eq!(d.read(COMMAND) & SB_OUT_FULL, 0);
        d.write(COMMAND, 0x20);
        let cb = d.read(DATA);
        assert_eq!(cb, CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE);
        d.write(COMMAND, 0x60);
        d.write(DATA, cb & !CB_TRANSLATE);
        d.write(COMMAND, 0xab);
        assert_eq!(d.read(DATA), 0, "keyboard interface test");
        d.write(DATA, 0xf2);
        assert_eq!(
            [d.read(DATA), d.read(DATA), d.read(DATA)],
            [ACK, 0xab, 0x83]
        );
        d.write(DATA, 0xed);
        d.write(DATA, 0x07);
        assert_eq!(
            [d.read(DATA), d.read(DATA)],
            [ACK, ACK],
            "LEDs and their argument"
        );
        assert!(irq.eventfd().read().unwrap() >= 1, "answers interrupt");
    }

    #[test]
    fn ctrl_alt_del_arrives_in_the_set_the_guest_reads() {
        let (mut d, _, irq) = dev();
        d.press_ctrl_alt_del().unwrap();
        let keys: Vec<u8> = (0..8).map(|_| d.read(DATA)).collect();
        assert_eq!(keys, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(irq.eventfd().read().unwrap(), 8, "one interrupt per byte");
        d.write(COMMAND, 0x60);
        d.write(DATA, CB_KBD_INT);
        d.press_ctrl_alt_del().unwrap();
        let keys: Vec<u8> = (0..11).map(|_| d.read(DATA)).collect();
        assert_eq!(
            keys,
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn a_guest_that_never_reads_gets_a_bounded_buffer() {
        let (mut d, _, _) = dev();
        for _ in 0..100 {
            d.write(DATA, 0xf2);
        }
        assert!(d.save().output.len() <= I8042_BUFFER_SIZE);
        d.state.output.clear();
        d.press_ctrl_alt_del().unwrap();
        d.press_ctrl_alt_del().unwrap();
        assert_eq!(d.press_ctrl_alt_del(), Err(KeyError::BufferFull));
        let too_big = I8042State {
            output: vec![0; 17].into(),
            ..I8042State::default()
        };
        let (r, i) = (
            EventFdTrigger::new().unwrap(),
            EventFdTrigger::new().unwrap(),
        );
        assert!(I8042::restore((r, i), &too_big).is_err());
    }

    #[test]
    fn a_state_saved_before_the_keyboard_existed_restores() {
        let old: I8042State = serde_json::from_str(r#"{"resets": 2}"#).unwrap();
        assert_eq!(old.resets, 2);
        assert_eq!(old.command_byte, I8042State::default().command_byte);
    }
}
