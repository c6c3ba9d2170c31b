//! The vCPU exit handler: a pure function from a KVM exit to what the run loop
//! does next. It reaches devices only through the vm-device bus, so it is
//! tested without `/dev/kvm`.

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::errno;

use super::VcpuError;

/// Why a vCPU stopped running guest code for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault (the guest's CPU reset).
    TripleFault,
    /// The guest asked for a reset through a system event (PSCI/ACPI).
    Reset,
    /// The guest asked to power off through a system event.
    PowerOff,
    /// The guest reported a crash through a system event.
    Crash,
    /// `KVM_EXIT_HLT`: the vCPU halted without an in-kernel LAPIC to wake it.
    Halted,
    /// The VMM asked the vCPU to exit.
    Requested,
}

/// What the run loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEmulation {
    /// The exit was handled: run the guest again.
    Handled,
    /// KVM_RUN was interrupted (a kick): look at pending commands.
    Interrupted,
    /// The vCPU is done.
    Stop(StopReason),
}

/// Maps one `KVM_RUN` result to the next step, dispatching port and MMIO
/// accesses to `bus`. Accesses no device claims read as all-ones (PIO) or
/// zeros (MMIO) and writes to them are dropped, as on real hardware.
pub fn handle_exit(
    exit: Result<VcpuExit<'_>, errno::Error>,
    bus: &IoManager,
) -> Result<VcpuEmulation, VcpuError> {
    match exit {
        Ok(VcpuExit::IoIn(port, data)) => {
            if bus.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
            }
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            if bus.pio_write(PioAddress(port), data).is_err() {
                log::trace!("unclaimed port write {port:#x} ({} bytes)", data.len());
            }
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if bus.mmio_read(MmioAddress(addr), data).is_err() {
                data.fill(0);
                log::debug!("unclaimed MMIO read {addr:#x} ({} bytes)", data.len());
            }
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if bus.mmio_write(MmioAddress(addr), data).is_err() {
                log::debug!("unclaimed MMIO write {addr:#x} ({} bytes)", data.len());
            }
            Ok(VcpuEmulation::Handled)
        }
        Ok(VcpuExit::Shutdown) => Ok(VcpuEmulation::Stop(StopReason::TripleFault)),
        Ok(VcpuExit::Hlt) => Ok(VcpuEmulation::Stop(StopReason::Halted)),
        Ok(VcpuExit::SystemEvent(kind, data)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuEmulation::Stop(StopReason::PowerOff)),
            KVM_SYSTEM_EVENT_RESET => Ok(VcpuEmulation::Stop(StopReason::Reset)),
            KVM_SYSTEM_EVENT_CRASH => Ok(VcpuEmulation::Stop(StopReason::Crash)),
            _ => Err(VcpuError::UnexpectedExit(format!(
                "system event {kind} {data:?}"
            ))),
        },
        Ok(VcpuExit::FailEntry(reason, cpu)) => Err(VcpuError::FailEntry { reason, cpu }),
        Ok(VcpuExit::InternalError) => Err(VcpuError::InternalError(Default::default())),
        Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => Ok(VcpuEmulation::Interrupted),
        Ok(other) => Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            Ok(VcpuEmulation::Interrupted)
        }
        Err(e) => Err(VcpuError::Run(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_device::bus::{MmioRange, PioAddressOffset, PioRange};
    use vm_device::{DeviceMmio, MutDevicePio};

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }
    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }
    struct Mmio;
    impl DeviceMmio for Mmio {
        fn mmio_read(&self, _: MmioAddress, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn mmio_write(&self, _: MmioAddress, _: u64, _: &[u8]) {}
    }

    fn bus() -> (IoManager, Arc<Mutex<Recorder>>) {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = IoManager::new();
        bus.register_pio(PioRange::new(PioAddress(0x3f8), 8).unwrap(), dev.clone())
            .unwrap();
        bus.register_mmio(
            MmioRange::new(MmioAddress(0xd000_0000), 0x1000).unwrap(),
            Arc::new(Mmio),
        )
        .unwrap();
        (bus, dev)
    }

    #[test]
    fn port_writes_reach_the_device_at_their_offset() {
        let (bus, dev) = bus();
        assert_eq!(
            handle_exit(Ok(VcpuExit::IoOut(0x3fa, &[7])), &bus).unwrap(),
            VcpuEmulation::Handled
        );
        assert_eq!(dev.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn port_reads_come_from_the_device_or_read_all_ones() {
        let (bus, _) = bus();
        let mut data = [0u8; 1];
        handle_exit(Ok(VcpuExit::IoIn(0x3fd, &mut data)), &bus).unwrap();
        assert_eq!(data, [0x45]);
        let mut data = [0u8; 2];
        handle_exit(Ok(VcpuExit::IoIn(0x80, &mut data)), &bus).unwrap();
        assert_eq!(data, [0xff, 0xff]);
        // An access straddling the end of the device's window is unclaimed.
        let mut data = [0u8; 4];
        handle_exit(Ok(VcpuExit::IoIn(0x3fe, &mut data)), &bus).unwrap();
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn mmio_is_dispatched_and_unclaimed_mmio_reads_zero() {
        let (bus, _) = bus();
        let mut data = [0xaau8; 4];
        handle_exit(Ok(VcpuExit::MmioRead(0xd000_0010, &mut data)), &bus).unwrap();
        assert_eq!(data, [0x10; 4]);
        let mut data = [0xaau8; 4];
        handle_exit(Ok(VcpuExit::MmioRead(0xe000_0000, &mut data)), &bus).unwrap();
        assert_eq!(data, [0; 4]);
        assert_eq!(
            handle_exit(Ok(VcpuExit::MmioWrite(0xe000_0000, &[1])), &bus).unwrap(),
            VcpuEmulation::Handled
        );
    }

    #[test]
    fn shutdown_and_system_events_stop_the_vcpu_with_their_reason() {
        let (bus, _) = bus();
        let stop = |e| handle_exit(Ok(e), &bus).unwrap();
        assert_eq!(
            stop(VcpuExit::Shutdown),
            VcpuEmulation::Stop(StopReason::TripleFault)
        );
        assert_eq!(stop(VcpuExit::Hlt), VcpuEmulation::Stop(StopReason::Halted));
        assert_eq!(
            stop(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            VcpuEmulation::Stop(StopReason::Reset)
        );
        assert_eq!(
            stop(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            VcpuEmulation::Stop(StopReason::PowerOff)
        );
        assert_eq!(
            stop(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])),
            VcpuEmulation::Stop(StopReason::Crash)
        );
    }

    #[test]
    fn failures_are_errors_with_their_data() {
        let (bus, _) = bus();
        match handle_exit(Ok(VcpuExit::FailEntry(0x80000021, 0)), &bus) {
            Err(VcpuError::FailEntry { reason, cpu }) => assert_eq!((reason, cpu), (0x80000021, 0)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            handle_exit(Ok(VcpuExit::InternalError), &bus),
            Err(VcpuError::InternalError(_))
        ));
        assert!(matches!(
            handle_exit(Ok(VcpuExit::Unknown), &bus),
            Err(VcpuError::UnexpectedExit(_))
        ));
        assert!(matches!(
            handle_exit(Err(errno::Error::new(libc::EFAULT)), &bus),
            Err(VcpuError::Run(_))
        ));
    }

    #[test]
    fn eintr_is_an_interruption_not_an_error() {
        let (bus, _) = bus();
        assert_eq!(
            handle_exit(Err(errno::Error::new(libc::EINTR)), &bus).unwrap(),
            VcpuEmulation::Interrupted
        );
        assert_eq!(
            handle_exit(Err(errno::Error::new(libc::EAGAIN)), &bus).unwrap(),
            VcpuEmulation::Interrupted
        );
    }
}
