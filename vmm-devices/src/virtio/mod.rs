//! Virtio devices and the virtio-mmio transport (virtio 1.2, modern
//! interface only).
//!
//! A device implements [`VirtioDevice`]: its type, features, queue sizes and
//! configuration space, and what to do when a queue is notified. The
//! transport ([`mmio::MmioTransport`]) owns the register state machine and the
//! queues; at `DRIVER_OK` it validates the queues and hands them to the device
//! in an [`ActivationContext`], and on reset it takes them back. Devices never
//! see the bus or KVM: notifications arrive as eventfds (the VMM makes them
//! ioeventfds) and interrupts leave through [`VirtioInterrupt`].

pub mod block;
pub mod console;
pub mod mmio;
mod queue;
pub mod rng;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::Queue;

pub use queue::{drain_queue, QueueBudget};

/// `VIRTIO_F_VERSION_1`: the modern interface, required by the transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`: notification suppression by ring indices.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Device type of virtio-console.
pub const TYPE_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Device type of virtio-rng.
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

/// How a device tells the driver something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// Buffers were added to a used ring.
    fn signal_used_queue(&self);
    /// The configuration space changed.
    fn signal_config_change(&self);
    /// The device hit an error it cannot recover from without a reset: sets
    /// `DEVICE_NEEDS_RESET` and sends a configuration change notification
    /// (virtio 1.2, 2.1.2).
    fn set_needs_reset(&self);
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActivationContext<M> {
    /// Guest memory.
    pub mem: M,
    /// The queues, validated, in index order.
    pub queues: Vec<Queue>,
    /// The interrupt line.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

impl<M> ActivationContext<M> {
    /// The context itself if the driver set up `expected` queues.
    pub fn expect_queues(self, expected: usize) -> Result<Self, ActivateError> {
        match self.queues.len() {
            n if n == expected => Ok(self),
            got => Err(ActivateError::QueueCount { expected, got }),
        }
    }

    /// Settles one [`drain_queue`] pass of `device`: asks for a reset when
    /// `broken_chains` could not be answered or the driver broke the ring,
    /// and returns whether to come back for more.
    pub fn settle(
        &self,
        device: &str,
        broken_chains: u64,
        result: Result<bool, virtio_queue::Error>,
    ) -> bool {
        if broken_chains > 0 {
            self.interrupt.set_needs_reset();
        }
        match result {
            Ok(more) => more,
            Err(e) => {
                guest_warn!("{device}: {e}; the device needs a reset");
                self.interrupt.set_needs_reset();
                false
            }
        }
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device got a different number of queues than it declared.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Declared.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The device-specific setup failed.
    #[error("device setup failed: {0}")]
    Setup(String),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice<M>: Send {
    /// Virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (the transport adds none; include
    /// [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads the configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; ignored by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored config write of {} bytes at {offset}",
            data.len()
        );
    }
    /// Starts the device with validated queues.
    fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError>;
    /// Stops the device and returns what activation gave it.
    fn reset(&mut self) -> Option<ActivationContext<M>>;
    /// Whether the device is active.
    fn is_active(&self) -> bool;
    /// The queues the device is serving (empty when inactive), for state
    /// capture.
    fn active_queues(&self) -> &[Queue];
    /// Queue `index` was notified. Returns true when the device stopped at
    /// its work budget with buffers left, to be called again.
    fn process_queue(&mut self, index: usize) -> bool;
    /// File descriptors, besides the queue notifiers, that the event loop
    /// should watch for this device (host input, say).
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// The `index`-th of [`VirtioDevice::event_fds`] is readable.
    fn process_event(&mut self, index: usize) {
        let _ = index;
    }
}

/// Copies `src` (a configuration space) into `data` from `offset`; bytes past
/// the end read as zero.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}

#[cfg(test)]
pub(crate) mod test_utils;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::{context, memory};
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn devices_refuse_the_wrong_number_of_queues() {
        let mem = memory();
        let (ctx, _) = context(&mem, Vec::new(), VIRTIO_F_VERSION_1);
        let mut rng: Rng<GuestMemoryMmap> = Rng::new();
        assert!(matches!(
            rng.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        assert!(!rng.is_active());
    }

    #[test]
    fn config_reads_are_bounded_by_the_space() {
        let space = [1u8, 2, 3, 4];
        let mut buf = [0xffu8; 4];
        read_config_bytes(&space, 2, &mut buf);
        assert_eq!(buf, [3, 4, 0, 0]);
        read_config_bytes(&space, 9, &mut buf);
        assert_eq!(buf, [0; 4]);
        read_config_bytes(&space, u64::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
