//! The COM1 8250/16550 UART, on vm-superio.

use std::sync::Arc;

use crate::metrics::UartMetrics;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::persist::{Persist, RestoreError};

pub use vm_superio::serial::SerialState;

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's register window.
pub const COM1_PORT_SIZE: u16 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Bytes the receive FIFO holds; host input beyond that waits.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// A UART whose transmitted bytes go to `W` and whose interrupt is `T`.
/// Host input enters through [`Serial::enqueue_input`], bounded by the FIFO.
pub struct Serial<T: Trigger, W: Write> {
    inner: vm_superio::Serial<T, NoEvents, W>,
    lost_output: u64,
    metrics: Arc<UartMetrics>,
}

impl<T: Trigger, W: Write> Serial<T, W> {
    /// A UART in its reset state.
    pub fn new(interrupt: T, out: W) -> Self {
        Self {
            inner: vm_superio::Serial::new(interrupt, out),
            lost_output: 0,
            metrics: Arc::default(),
        }
    }

    /// The port's counters.
    pub fn metrics(&self) -> Arc<UartMetrics> {
        self.metrics.clone()
    }

    /// Reads register `offset` (0-7).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    /// Writes register `offset` (0-7). Output the host cannot take is counted
    /// in [`Serial::lost_output`]; the guest is never blocked.
    pub fn write(&mut self, offset: u8, value: u8) {
        // Offset 0 is the transmit register unless the divisor latch is
        // open (LCR bit 7; reading LCR has no side effect).
        let transmit = offset == 0 && self.inner.read(3) & 0x80 == 0;
        if transmit {
            self.metrics.write_count.inc();
        }
        if let Err(e) = self.inner.write(offset, value) {
            self.lost_output += 1;
            self.metrics.missed_write_count.inc();
            log::debug!("serial: write of register {offset}: {e:?}");
        }
    }

    /// Queues host input for the guest; returns how many bytes the FIFO took
    /// (0 when it is full: try again after the guest reads).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => {
                self.metrics.read_count.add(n as u64);
                n
            }
            Err(e) => {
                log::debug!("serial: input: {e:?}");
                0
            }
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Bytes of output the host writer refused.
    pub fn lost_output(&self) -> u64 {
        self.lost_output
    }

    /// The output writer.
    pub fn output(&self) -> &W {
        self.inner.writer()
    }
}

/// vm-superio's `SerialState` as serde sees it (its fields, by name).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState", deny_unknown_fields)]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The saved registers and receive FIFO of a [`Serial`]: vm-superio's
/// `SerialState`, as serde data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SerialSnapshot(#[serde(with = "SerialStateDef")] pub SerialState);

impl<T: Trigger, W: Write> Persist for Serial<T, W> {
    type State = SerialSnapshot;
    type Args = (T, W);
    type Error = RestoreError;

    fn save(&self) -> SerialSnapshot {
        SerialSnapshot(self.inner.state())
    }

    /// Refuses a FIFO longer than [`SERIAL_FIFO_SIZE`]; raises the
    /// interrupt again if the restored registers say one is pending.
    fn restore((interrupt, out): (T, W), s: &SerialSnapshot) -> Result<Self, RestoreError> {
        if s.0.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(RestoreError::invalid(
                "serial receive FIFO",
                format!("{} bytes, at most {SERIAL_FIFO_SIZE}", s.0.in_buffer.len()),
            ));
        }
        let inner = vm_superio::Serial::from_state(&s.0, interrupt, NoEvents, out)
            .map_err(|e| RestoreError::invalid("serial state", format!("{e:?}")))?;
        Ok(Self {
            inner,
            lost_output: 0,
            metrics: Arc::default(),
        })
    }
}

impl<T: Trigger, W: Write> MutDevicePio for Serial<T, W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if off < COM1_PORT_SIZE as u8 => data[0] = self.read(off),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if off < COM1_PORT_SIZE as u8 => self.write(off, data[0]),
            _ => log::debug!(
                "serial: ignored {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;

    const THR: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const LSR: u8 = 5;
    const SCR: u8 = 7;

    fn serial() -> Serial<EventFdTrigger, Vec<u8>> {
        Serial::new(EventFdTrigger::new().unwrap(), Vec::new())
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("closed"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_and_thr_stays_empty() {
        let mut s = serial();
        for b in b"ok" {
            s.write(THR, *b);
        }
        assert_eq!(s.output(), b"ok");
        assert_eq!(s.read(LSR) & 0x60, 0x60, "THRE and TEMT set");
    }

    #[test]
    fn received_bytes_set_data_ready_and_raise_the_interrupt_when_enabled() {
        let mut s = serial();
        s.write(IER, 0x01); // received-data interrupt
        let _ = s.inner.interrupt_evt().eventfd().read();
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(s.read(LSR) & 1, 1);
        assert_eq!(s.read(IIR) & 0x0f, 0x04, "received data available");
        assert!(s.inner.interrupt_evt().eventfd().read().unwrap() >= 1);
        assert_eq!(s.read(THR), b'a');
        assert_eq!(s.read(THR), b'b');
        assert_eq!(s.read(LSR) & 1, 0);
    }

    #[test]
    fn input_beyond_the_fifo_is_refused_not_dropped() {
        let mut s = serial();
        let big = [b'x'; 100];
        assert_eq!(s.enqueue_input(&big), SERIAL_FIFO_SIZE);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(b"y"), 0);
        s.read(THR);
        assert_eq!(s.enqueue_input(b"y"), 1);
    }

    #[test]
    fn divisor_latch_and_scratch_registers_hold_values() {
        let mut s = serial();
        s.write(SCR, 0x5a);
        assert_eq!(s.read(SCR), 0x5a);
        s.write(LCR, 0x80); // DLAB
        s.write(0, 0x0c);
        s.write(1, 0x00);
        assert_eq!(s.read(0), 0x0c);
        assert_eq!(s.save().0.baud_divisor_low, 0x0c);
        s.write(LCR, 0x03);
        assert_eq!(s.read(LCR), 0x03);
    }

    #[test]
    fn output_errors_are_counted_not_fatal() {
        let mut s = Serial::new(EventFdTrigger::new().unwrap(), Broken);
        s.write(THR, b'a');
        s.write(THR, b'b');
        assert_eq!(s.lost_output(), 2);
    }

    #[test]
    fn wide_and_out_of_window_accesses_are_harmless() {
        let mut s = serial();
        let base = PioAddress(COM1_PORT);
        let mut wide = [0u8; 2];
        s.pio_read(base, 0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        s.pio_write(base, 0, b"ab");
        let mut one = [0u8; 1];
        s.pio_read(base, 9, &mut one);
        assert_eq!(one, [0xff]);
        s.pio_write(base, u16::MAX, b"c");
        assert!(s.output().is_empty());
    }

    #[test]
    fn state_round_trips_through_serde_with_pending_input() {
        let mut s = serial();
        s.write(SCR, 0x42);
        s.write(IER, 0x03);
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let json = serde_json::to_string(&s.save()).unwrap();
        let state: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let mut restored = Serial::restore((irq.try_clone().unwrap(), Vec::new()), &state).unwrap();
        assert_eq!(restored.save(), s.save());
        assert_eq!(restored.read(0), b'a', "the FIFO came back in order");
        assert!(
            irq.eventfd().read().is_ok(),
            "pending data raises the interrupt"
        );
    }

    #[test]
    fn an_overlong_fifo_or_unknown_field_is_refused() {
        let mut state = serial().save();
        state.0.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        let err = Serial::restore((EventFdTrigger::new().unwrap(), Vec::new()), &state);
        assert!(matches!(err, Err(RestoreError::Invalid { .. })));
        let mut json: serde_json::Value = serde_json::to_value(serial().save()).unwrap();
        json["extra"] = 1.into();
        assert!(serde_json::from_value::<SerialSnapshot>(json).is_err());
    }
}
