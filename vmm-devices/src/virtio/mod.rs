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
pub mod net;
mod queue;
pub mod rng;
pub mod vsock;

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryBackend;

pub use queue::{drain_queue, drain_queue_until, QueueBudget, Step};

/// `VIRTIO_F_VERSION_1`: the modern interface, required by the transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`: notification suppression by ring indices.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Device type of virtio-console.
pub const TYPE_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Device type of virtio-net.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Device type of virtio-vsock.
pub const TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
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
    #[error("device setup failed")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What every virtio device has in common, whatever it does: its type, the
/// features it offers, its queue maxima, and, while the driver has it
/// running, what activation gave it. A device holds one and hands it out
/// through [`VirtioDevice::common`]; the trait's provided methods do the
/// rest (activation, reset, state capture).
///
/// ```
/// use vmm_devices::virtio::{VirtioCommon, VIRTIO_F_VERSION_1};
/// use vm_memory::GuestMemoryMmap;
///
/// let common: VirtioCommon<GuestMemoryMmap> = VirtioCommon::new(42, VIRTIO_F_VERSION_1, &[64, 64]);
/// assert_eq!(common.queue_max_sizes(), &[64, 64]);
/// assert!(!common.is_active());
/// ```
pub struct VirtioCommon<M> {
    device_type: u32,
    features: u64,
    queue_sizes: Vec<u16>,
    /// What activation gave the device; `None` while it is inactive.
    pub active: Option<ActivationContext<M>>,
}

impl<M> VirtioCommon<M> {
    /// An inactive device of `device_type` offering `features`, with one
    /// queue per entry of `queue_sizes` (each entry its maximum size).
    pub fn new(device_type: u32, features: u64, queue_sizes: &[u16]) -> Self {
        Self {
            device_type,
            features,
            queue_sizes: queue_sizes.to_vec(),
            active: None,
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The features offered.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Each queue's maximum size.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Takes the activation context if it has one queue per declared queue.
    pub fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError> {
        self.active = Some(ctx.expect_queues(self.queue_sizes.len())?);
        Ok(())
    }

    /// Gives back what activation gave.
    pub fn reset(&mut self) -> Option<ActivationContext<M>> {
        self.active.take()
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The queues being served (empty while inactive).
    pub fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |c| &c.queues)
    }
}

/// What one [`VirtioCommon::drain`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// The work budget ran out with chains left: call again.
    pub more: bool,
    /// Chains the handler could not answer (the device then asks for a
    /// reset).
    pub broken_chains: u64,
}

impl<M: GuestMemoryBackend> VirtioCommon<M> {
    /// Serves queue `index` of an active device: pops every available chain
    /// (within a [`QueueBudget`]), lets `handle` answer it and publishes the
    /// used entry with the bytes `handle` wrote, signals the driver as
    /// `EVENT_IDX` says, and asks for a reset when `handle` returns `None`
    /// (a chain it cannot answer) or the driver broke the ring. `device`
    /// names the device in rate-limited warnings.
    pub fn drain<F>(&mut self, index: usize, device: &str, mut handle: F) -> Drained
    where
        F: FnMut(&M, DescriptorChain<&M>) -> Option<u32>,
    {
        self.drain_until(index, device, |mem, chain| {
            handle(mem, chain).map(Step::Used)
        })
    }

    /// [`drain`](VirtioCommon::drain) with a handler that may also put a
    /// chain back for later ([`Step::Later`], see [`drain_queue_until`]).
    pub fn drain_until<F>(&mut self, index: usize, device: &str, mut handle: F) -> Drained
    where
        F: FnMut(&M, DescriptorChain<&M>) -> Option<Step>,
    {
        let Some(ctx) = self.active.as_mut() else {
            return Drained::default();
        };
        let Some(queue) = ctx.queues.get_mut(index) else {
            return Drained::default();
        };
        let mem = &ctx.mem;
        let mut broken_chains = 0;
        let budget = QueueBudget::for_queue(queue);
        let result = drain_queue_until(queue, mem, ctx.interrupt.as_ref(), budget, |chain| {
            handle(mem, chain).unwrap_or_else(|| {
                broken_chains += 1;
                Step::Used(0)
            })
        });
        let more = ctx.settle(device, broken_chains, result);
        Drained {
            more,
            broken_chains,
        }
    }
}

/// A virtio device, independent of its transport.
///
/// A device owns a [`VirtioCommon`] and implements what is its own: the
/// configuration space and what a queue notification means. Activation,
/// reset and state capture come with the trait. The transport downcasts a
/// `dyn VirtioDevice` back to the concrete device (through [`Any`]) when the
/// VMM asks for it.
///
/// ```
/// use vm_memory::GuestMemoryMmap;
/// use vmm_devices::virtio::{VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1};
///
/// /// A device with one queue that completes every buffer untouched.
/// struct Null {
///     common: VirtioCommon<GuestMemoryMmap>,
///     seen: u64,
/// }
///
/// impl VirtioDevice<GuestMemoryMmap> for Null {
///     fn common(&self) -> &VirtioCommon<GuestMemoryMmap> {
///         &self.common
///     }
///     fn common_mut(&mut self) -> &mut VirtioCommon<GuestMemoryMmap> {
///         &mut self.common
///     }
///     fn read_config(&self, _offset: u64, data: &mut [u8]) {
///         data.fill(0);
///     }
///     fn process_queue(&mut self, index: usize) -> bool {
///         let seen = &mut self.seen;
///         self.common.drain(index, "null", |_mem, _chain| {
///             *seen += 1;
///             Some(0) // bytes written into the chain's buffers
///         }).more
///     }
/// }
///
/// let dev = Null { common: VirtioCommon::new(0x4242, VIRTIO_F_VERSION_1, &[16]), seen: 0 };
/// assert_eq!(dev.queue_max_sizes(), &[16]);
/// let any: &dyn VirtioDevice<GuestMemoryMmap> = &dev;
/// assert!((any as &dyn std::any::Any).downcast_ref::<Null>().is_some());
/// ```
pub trait VirtioDevice<M: 'static>: Any + Send {
    /// What the device has in common with every other.
    fn common(&self) -> &VirtioCommon<M>;
    /// See [`VirtioDevice::common`].
    fn common_mut(&mut self) -> &mut VirtioCommon<M>;
    /// Virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }
    /// Features offered (the transport adds none; include
    /// [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64 {
        self.common().features()
    }
    /// Reads the configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; ignored by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored config write of {} bytes at {offset}",
            data.len()
        );
    }
    /// Starts the device with validated queues. The default takes the
    /// context when it has one queue per declared queue.
    fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError> {
        self.common_mut().activate(ctx)
    }
    /// Stops the device and returns what activation gave it.
    fn reset(&mut self) -> Option<ActivationContext<M>> {
        self.common_mut().reset()
    }
    /// Whether the device is active.
    fn is_active(&self) -> bool {
        self.common().is_active()
    }
    /// The queues the device is serving (empty when inactive), for state
    /// capture.
    fn active_queues(&self) -> &[Queue] {
        self.common().active_queues()
    }
    /// Queue `index` was notified. Returns true when the device stopped at
    /// its work budget with buffers left, to be called again.
    fn process_queue(&mut self, index: usize) -> bool;
    /// Makes what the device wrote durable (a disk's data on its medium),
    /// when the VM stops. Nothing to do by default.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// File descriptors, besides the queue notifiers, that the event loop
    /// should watch for this device (host input, say).
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether the `index`-th of [`VirtioDevice::event_fds`] is watched
    /// edge-triggered (the device then reads it until it would block, or
    /// has its own way back, such as a queue notification): for a source
    /// the device may leave unread while the guest has no room, like a TAP.
    /// Level-triggered by default.
    fn event_edge_triggered(&self, index: usize) -> bool {
        let _ = index;
        false
    }
    /// The `index`-th of [`VirtioDevice::event_fds`] is readable.
    fn process_event(&mut self, index: usize) {
        let _ = index;
    }
    /// The device's own state for a snapshot, beyond what the transport
    /// saves (registers, queues): what the driver may have seen of it, as
    /// serde data. `None` (the default): nothing of its own.
    fn save_device_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Checks a state [`save_device_state`](VirtioDevice::save_device_state)
    /// gave against this freshly built, inactive device and applies it,
    /// before the transport restores the queues. The state is untrusted
    /// input. The default accepts only "nothing".
    fn restore_device_state(
        &mut self,
        state: Option<&serde_json::Value>,
    ) -> Result<(), crate::persist::RestoreError> {
        match state {
            None => Ok(()),
            Some(_) => Err(crate::persist::RestoreError::invalid(
                "device state",
                "this device keeps no state of its own",
            )),
        }
    }
}

/// Decodes a device's own state saved as serde data (see
/// [`VirtioDevice::save_device_state`]).
pub fn decode_device_state<T: serde::de::DeserializeOwned>(
    device: &str,
    state: Option<&serde_json::Value>,
) -> Result<T, crate::persist::RestoreError> {
    let value = state.ok_or_else(|| {
        crate::persist::RestoreError::invalid(format!("{device} state"), "missing")
    })?;
    T::deserialize(value).map_err(|e| {
        crate::persist::RestoreError::invalid(format!("{device} state"), e.to_string())
    })
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
mod tests {
    use super::*;
    use crate::test_utils::{context, memory};
    use crate::virtio::rng::Rng;
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
