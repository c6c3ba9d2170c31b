//! Counters the devices keep for the operator: lock-free, incremented on
//! the device's own thread and read from any other (a metrics writer, an
//! API). The names follow Firecracker's metrics so that dashboards built for
//! it read ours.
//!
//! ```
//! use vmm_devices::metrics::Counter;
//!
//! let c = Counter::default();
//! c.add(3);
//! assert_eq!(c.take_delta(), 3);
//! c.inc();
//! assert_eq!((c.get(), c.take_delta()), (4, 1));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonic counter that also remembers what was last reported, so that
/// a writer can report increments (Firecracker's metrics are increments
/// since the last flush).
#[derive(Debug, Default)]
pub struct Counter {
    value: AtomicU64,
    reported: AtomicU64,
}

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    /// The total since the device was made.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// The increase since the last call, which is now reported.
    pub fn take_delta(&self) -> u64 {
        let now = self.get();
        now.wrapping_sub(self.reported.swap(now, Ordering::Relaxed))
    }
}

macro_rules! counters {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: Counter,)*
        }

        impl $name {
            /// Every counter with its name, for a writer.
            pub fn counters(&self) -> Vec<(&'static str, &Counter)> {
                vec![$((stringify!($field), &self.$field),)*]
            }
        }
    };
}

counters!(
    /// A virtio-blk device's counters.
    BlockMetrics {
        /// Reads completed.
        read_count,
        /// Bytes read for the guest.
        read_bytes,
        /// Writes completed.
        write_count,
        /// Bytes written for the guest.
        write_bytes,
        /// Flushes completed.
        flush_count,
        /// Requests the device refused (bad type, range, layout).
        invalid_reqs_count,
        /// Requests the host failed (the guest got an I/O error).
        execute_fails,
        /// Queue notifications handled.
        queue_event_count,
        /// Chains without a status byte or outside guest memory.
        event_fails,
        /// Times the rate limiter made a request wait.
        rate_limiter_throttled_events,
    }
);

counters!(
    /// A virtio-net device's counters.
    NetMetrics {
        /// Frames given to the guest.
        rx_packets_count,
        /// Bytes of frames given to the guest (without headers).
        rx_bytes_count,
        /// Receive queue notifications handled.
        rx_queue_event_count,
        /// Times receive waited for the guest to post buffers.
        rx_no_buffers,
        /// Frames copied through the device's buffer (the guest had posted
        /// less than a largest frame's room).
        rx_bounced,
        /// Frames larger than the guest's receive buffer (without
        /// mergeable buffers), dropped.
        rx_dropped_too_big,
        /// Receive buffers too small for a header, given back empty.
        rx_bad_buffers,
        /// Frames larger than the TAP's MTU said (the MTU grew), dropped
        /// once before the device expects the largest frames.
        rx_truncated,
        /// Times the receive limiter made the device wait.
        rx_rate_limiter_throttled,
        /// Frames sent for the guest.
        tx_packets_count,
        /// Bytes of frames sent for the guest (without headers).
        tx_bytes_count,
        /// Transmit queue notifications handled.
        tx_queue_event_count,
        /// Transmit chains shorter than a header, longer than the largest
        /// frame, or in too many pieces, dropped.
        tx_malformed_frames,
        /// Transmit chains outside guest memory.
        tx_fails,
        /// Frames the guest sent while the link was down, dropped.
        tx_dropped_link_down,
        /// Frames dropped because the TAP would block.
        tx_dropped_tap_full,
        /// Times the transmit limiter made the device wait.
        tx_rate_limiter_throttled,
        /// Reads from the TAP that failed.
        tap_read_fails,
        /// Frames the TAP refused (bad headers from the guest).
        tap_write_fails,
    }
);

counters!(
    /// A virtio-vsock device's counters.
    VsockMetrics {
        /// Packets given to the guest.
        rx_packets_count,
        /// Bytes of host data given to the guest.
        rx_bytes_count,
        /// Times the device waited for the guest to post receive buffers.
        rx_no_buffers,
        /// Reads from host sockets that failed.
        rx_read_fails,
        /// Packets the guest sent.
        tx_packets_count,
        /// Bytes of data the guest sent.
        tx_bytes_count,
        /// Packets dropped or refused as malformed or misaddressed.
        tx_malformed,
        /// Writes to host sockets that failed.
        tx_write_fails,
        /// Connections opened.
        conns_added,
        /// Connections closed.
        conns_removed,
        /// Connections closed by a device reset.
        conns_killed,
        /// Connections refused (nobody listening, too many, bad CONNECT).
        conn_refused,
        /// Connections reset because the guest sent past its credit.
        credit_violations,
        /// Connections reset because the guest did not answer a host
        /// request, or did not close after the host program did, in time.
        conns_timed_out,
    }
);

counters!(
    /// A virtio-rng device's counters.
    EntropyMetrics {
        /// Requests answered.
        entropy_event_count,
        /// Random bytes given to the guest.
        entropy_bytes,
        /// Host getrandom failures.
        host_rng_fails,
        /// Chains the device could not answer.
        entropy_event_fails,
    }
);

counters!(
    /// The serial port's counters.
    UartMetrics {
        /// Bytes the guest wrote.
        write_count,
        /// Bytes the guest wrote that the host lost.
        missed_write_count,
        /// Bytes of host input given to the guest.
        read_count,
    }
);

counters!(
    /// The vCPUs' counters (all vCPUs of a VM together).
    VcpuMetrics {
        /// Port reads that left the guest.
        exit_io_in,
        /// Port writes that left the guest.
        exit_io_out,
        /// MMIO reads that left the guest.
        exit_mmio_read,
        /// MMIO writes that left the guest.
        exit_mmio_write,
        /// `KVM_RUN` failures and exits the VMM cannot handle.
        failures,
    }
);

/// One device's counters.
#[derive(Clone, Debug)]
pub enum DeviceMetrics {
    /// The vCPUs.
    Vcpu(Arc<VcpuMetrics>),
    /// A virtio-blk device.
    Block(Arc<BlockMetrics>),
    /// A virtio-rng device.
    Entropy(Arc<EntropyMetrics>),
    /// A virtio-net device.
    Net(Arc<NetMetrics>),
    /// A virtio-vsock device.
    Vsock(Arc<VsockMetrics>),
    /// The serial port.
    Uart(Arc<UartMetrics>),
}

/// The counters of every device of a VM, by name (such as `block_rootfs`),
/// shared by whoever builds the VM and whoever reports.
#[derive(Clone, Debug, Default)]
pub struct MetricsRegistry {
    entries: Arc<Mutex<Vec<(String, DeviceMetrics)>>>,
}

impl MetricsRegistry {
    /// Adds a device's counters under `name`.
    pub fn register(&self, name: impl Into<String>, metrics: DeviceMetrics) {
        if let Ok(mut e) = self.entries.lock() {
            e.push((name.into(), metrics));
        }
    }

    /// Every registered device, in registration order.
    pub fn entries(&self) -> Vec<(String, DeviceMetrics)> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }
}
