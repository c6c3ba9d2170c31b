//! The virtio-net device.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{GuestMemoryBackend, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::MacAddr;
use crate::metrics::NetMetrics;
use crate::persist::RestoreError;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use crate::virtio::{
    decode_device_state, read_config_bytes, ActivateError, ActivationContext, QueueBudget, Step,
    VirtioCommon, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// The largest frame with its header: 12 bytes of virtio-net header and
/// 65550 of Ethernet frame (a 64 KiB TSO segment with its headers).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

const RX: usize = 0;
const TX: usize = 1;
/// `readv`/`writev` take at most this many pieces.
const MAX_IOV: usize = 1024;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Device events, in [`VirtioDevice::event_fds`] order.
pub(super) const EV_TAP: usize = 0;
pub(super) const EV_RX_LIMITER: usize = 1;
pub(super) const EV_TX_LIMITER: usize = 2;
pub(super) const EV_KICK: usize = 3;

/// Why a NIC could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A rate limiter configuration was refused.
    #[error("bad rate limiter")]
    RateLimiter(#[from] RateLimiterError),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The saved state of a [`Net`]: what the driver may have seen of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address offered, if one was.
    pub mac: Option<MacAddr>,
    /// The link status the driver saw.
    pub link_up: bool,
}

/// One posted receive chain, resolved to host memory.
struct RxChain {
    head: u16,
    /// Its pieces: `slices[first..first + count]`.
    first: usize,
    count: usize,
    /// Bytes it holds.
    capacity: usize,
}

/// A virtio-net device on a TAP.
pub struct Net<M> {
    common: VirtioCommon<M>,
    tap: Tap,
    mac: Option<MacAddr>,
    link_up: bool,
    /// A frame read into `bounce` that waits for guest buffers: its length.
    held: Option<usize>,
    /// The TAP's MTU when the device was made.
    mtu: usize,
    /// The largest frame (with its header) the TAP is expected to hand
    /// over: a whole 64 KiB segment when the driver takes segmentation
    /// offloads, else an MTU-sized frame (with a VLAN tag). Frames up to it
    /// are read straight into guest buffers.
    frame_max: usize,
    bounce: Vec<u8>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// Written when the device wants to come back to the receive side.
    kick: EventFd,
    metrics: Arc<NetMetrics>,
}

impl<M> Net<M> {
    /// A NIC on `tap`, offering `mac` to the guest if given (the guest
    /// picks its own otherwise), link up, no rate limits.
    pub fn new(tap: Tap, mac: Option<MacAddr>) -> Result<Self, NetError> {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN);
        if mac.is_some() {
            features |= bit(VIRTIO_NET_F_MAC);
        }
        let unlimited = RateLimiterConfig::default();
        let mtu = tap.mtu().unwrap_or(1500);
        Ok(Self {
            common: VirtioCommon::new(TYPE_NET, features, &[NET_QUEUE_SIZE; 2]),
            tap,
            mac,
            link_up: true,
            held: None,
            mtu,
            frame_max: MAX_FRAME,
            bounce: vec![0; MAX_FRAME],
            rx_limiter: RateLimiter::new(&unlimited)?,
            tx_limiter: RateLimiter::new(&unlimited)?,
            kick: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            metrics: Arc::default(),
        })
    }

    /// The MAC address offered to the guest.
    pub fn mac(&self) -> Option<MacAddr> {
        self.mac
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Sets new limits for receive (host to guest) and transmit, taking
    /// effect at once; `None` leaves that side as it is.
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), NetError> {
        for c in [rx, tx].into_iter().flatten() {
            RateLimiter::check(c)?;
        }
        if let Some(c) = rx {
            self.rx_limiter.update(c)?;
        }
        if let Some(c) = tx {
            self.tx_limiter.update(c)?;
        }
        // Whatever was throttled may go on.
        let _ = self.kick.write(1);
        Ok(())
    }

    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac.unwrap_or_default().0);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs (meaningful with VIRTIO_NET_F_MQ only).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

/// The TAP offloads that match what the driver accepted for the frames it
/// receives (only consistent sets: segmentation needs checksum offload).
fn tap_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= TUN_F_TSO6;
        }
        if flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && acked & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
            flags |= TUN_F_TSO_ECN;
        }
    }
    flags
}

fn iovec_of<B: BitmapSlice>(s: &VolatileSlice<'_, B>) -> libc::iovec {
    libc::iovec {
        iov_base: s.ptr_guard_mut().as_ptr().cast(),
        iov_len: s.len(),
    }
}

/// Resolves the descriptors of `chain` that are device-writable (`write`)
/// or readable into host slices, appending to `out`. Returns the bytes they
/// hold, or `None` if a buffer is outside guest memory.
fn resolve<'m, M: GuestMemoryBackend>(
    mem: &'m M,
    chain: DescriptorChain<&'m M>,
    write: bool,
    out: &mut Vec<VolatileSlice<'m, vm_memory::bitmap::MS<'m, M>>>,
) -> Option<usize> {
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() != write {
            continue;
        }
        for s in mem.get_slices(desc.addr(), desc.len() as usize) {
            let s = s.ok()?;
            total += s.len();
            out.push(s);
        }
    }
    Some(total)
}

/// What one receive attempt did.
enum Rx {
    /// A frame went to the guest.
    Delivered,
    /// Something changed (more buffers, a frame dropped): go on.
    Again,
    /// Nothing more to do until the next event of some kind.
    Stop,
}

impl<M: GuestMemoryBackend + Send + 'static> Net<M> {
    /// Moves frames from the TAP into posted receive buffers until the TAP
    /// is empty, the guest has no room, the limiter says wait, or the work
    /// budget runs out (then the device kicks itself to come back).
    fn receive(&mut self) {
        if !self.link_up {
            return;
        }
        let Some(ctx) = self.common.active.as_mut() else {
            return;
        };
        let mrg = ctx.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let queue = &mut ctx.queues[RX];
        let mem = &ctx.mem;
        let budget = QueueBudget::for_queue(queue).0;
        let mut delivered = 0usize;
        let mut broken = false;
        let mut pass = RxPass {
            frame_max: &mut self.frame_max,
            iov: Vec::new(),
            tap: &self.tap,
            bounce: &mut self.bounce,
            held: &mut self.held,
            limiter: &mut self.rx_limiter,
            metrics: &self.metrics,
            mrg,
            slices: Vec::new(),
            chains: VecDeque::new(),
            broken: &mut broken,
        };
        if queue.disable_notification(mem).is_err() {
            broken = true;
        } else {
            let mut rounds = 0usize;
            loop {
                if rounds >= budget {
                    let _ = self.kick.write(1);
                    break;
                }
                rounds += 1;
                match pass.one_frame(queue, mem) {
                    Ok(Rx::Delivered) => delivered += 1,
                    Ok(Rx::Again) => {}
                    Ok(Rx::Stop) => break,
                    Err(_) => {
                        *pass.broken = true;
                        break;
                    }
                }
            }
            pass.rewind(queue);
        }
        if delivered > 0 {
            match queue.needs_notification(mem) {
                Ok(false) => {}
                _ => ctx.interrupt.signal_used_queue(),
            }
        }
        if broken {
            crate::guest_warn!(
                "virtio-net: the driver broke the receive ring; the device needs a reset"
            );
            ctx.interrupt.set_needs_reset();
        }
    }

    /// Sends every available transmit chain to the TAP (within the work
    /// budget: returns true to be called again), until the limiter says
    /// wait (its timer brings the device back).
    fn transmit(&mut self) -> bool {
        if self.tx_limiter.is_blocked() {
            return false;
        }
        let (tap, limiter, metrics, link_up) =
            (&self.tap, &mut self.tx_limiter, &self.metrics, self.link_up);
        let mut iov: Vec<libc::iovec> = Vec::new();
        let done = self.common.drain_until(TX, "virtio-net", |mem, chain| {
            let mut slices = Vec::with_capacity(4);
            let Some(len) = resolve(mem, chain, false, &mut slices) else {
                metrics.tx_fails.inc();
                crate::guest_warn!("virtio-net: a transmit buffer is outside guest memory");
                return None;
            };
            if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) || slices.len() > MAX_IOV {
                metrics.tx_malformed_frames.inc();
                crate::guest_warn!(
                    "virtio-net: dropped a {len}-byte transmit chain of {} pieces (header {VNET_HDR_LEN}, at most {MAX_FRAME} bytes and {MAX_IOV} pieces)",
                    slices.len()
                );
                return Some(Step::Used(0));
            }
            if !link_up {
                metrics.tx_dropped_link_down.inc();
                return Some(Step::Used(0));
            }
            let frame = (len - VNET_HDR_LEN) as u64;
            if !limiter.consume(frame) {
                metrics.tx_rate_limiter_throttled.inc();
                return Some(Step::Later);
            }
            iov.clear();
            iov.extend(slices.iter().map(iovec_of));
            // SAFETY: every iovec is a slice of guest memory, which stays
            // mapped while `mem` is borrowed here.
            match unsafe { tap.writev(&iov) } {
                Ok(true) => {
                    metrics.tx_packets_count.inc();
                    metrics.tx_bytes_count.add(frame);
                }
                Ok(false) => metrics.tx_dropped_tap_full.inc(),
                Err(e) => {
                    metrics.tap_write_fails.inc();
                    crate::guest_warn!("virtio-net: the TAP refused a frame from the guest: {e}");
                }
            }
            Some(Step::Used(0))
        });
        done.more
    }
}

/// The state of one receive pass: chains popped from the queue and not yet
/// used (given back at the end of the pass).
struct RxPass<'a, 'm, M: GuestMemoryBackend + 'm> {
    frame_max: &'a mut usize,
    iov: Vec<libc::iovec>,
    tap: &'a Tap,
    bounce: &'a mut Vec<u8>,
    held: &'a mut Option<usize>,
    limiter: &'a mut RateLimiter,
    metrics: &'a NetMetrics,
    mrg: bool,
    slices: Vec<VolatileSlice<'m, vm_memory::bitmap::MS<'m, M>>>,
    chains: VecDeque<RxChain>,
    broken: &'a mut bool,
}

impl<'m, M: GuestMemoryBackend> RxPass<'_, 'm, M> {
    /// Pops chains until the popped ones hold `want` bytes (one chain
    /// without mergeable buffers) or the queue is empty.
    fn gather(
        &mut self,
        queue: &mut Queue,
        mem: &'m M,
        want: usize,
    ) -> Result<(), virtio_queue::Error> {
        loop {
            let have: usize = self.chains.iter().map(|c| c.capacity).sum();
            if have >= want || (!self.mrg && !self.chains.is_empty()) {
                return Ok(());
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                return Ok(());
            };
            let head = chain.head_index();
            let first = self.slices.len();
            match resolve(mem, chain, true, &mut self.slices) {
                Some(capacity) if capacity >= VNET_HDR_LEN => self.chains.push_back(RxChain {
                    head,
                    first,
                    count: self.slices.len() - first,
                    capacity,
                }),
                Some(_) => {
                    // Too small for even the header: give it back empty.
                    self.slices.truncate(first);
                    self.metrics.rx_bad_buffers.inc();
                    queue.add_used(mem, head, 0)?;
                }
                None => {
                    self.slices.truncate(first);
                    crate::guest_warn!("virtio-net: a receive buffer is outside guest memory");
                    queue.add_used(mem, head, 0)?;
                    *self.broken = true;
                    return Ok(());
                }
            }
        }
    }

    /// Gives back the chains popped but not used.
    fn rewind(&mut self, queue: &mut Queue) {
        let n = self.chains.len() as u16;
        queue.set_next_avail(queue.next_avail().wrapping_sub(n));
        self.chains.clear();
        self.slices.clear();
    }

    /// The pieces of the first `k` chains, with the whole count.
    fn pieces(&self, k: usize) -> std::ops::Range<usize> {
        let Some(first) = self.chains.front() else {
            return 0..0;
        };
        let end = self
            .chains
            .iter()
            .take(k)
            .map(|c| c.first + c.count)
            .max()
            .unwrap_or(first.first);
        first.first..end
    }

    /// Publishes a frame of `len` bytes that fills the first chains, with
    /// `num_buffers` set, and takes its cost from the limiter.
    fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
    ) -> Result<(), virtio_queue::Error> {
        let mut left = len;
        let mut used = Vec::new();
        while left > 0 {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            let n = left.min(c.capacity);
            used.push((c, n));
            left -= n;
        }
        let nbuf = (used.len() as u16).to_le_bytes();
        if self.chains.is_empty() {
            // Every piece resolved so far is spoken for.
            let last = used.last().map_or(0, |(c, _)| c.first + c.count);
            debug_assert!(last <= self.slices.len());
        }
        if let Some((c, _)) = used.first() {
            write_at(
                &self.slices[c.first..c.first + c.count],
                NUM_BUFFERS_OFFSET,
                &nbuf,
            );
        }
        for (c, n) in used {
            queue.add_used(mem, c.head, n as u32)?;
        }
        self.metrics.rx_packets_count.inc();
        let frame = (len - VNET_HDR_LEN) as u64;
        self.metrics.rx_bytes_count.add(frame);
        if !self.limiter.consume_forced(frame) {
            self.metrics.rx_rate_limiter_throttled.inc();
        }
        Ok(())
    }

    /// Copies the held frame into the popped chains, if they hold it.
    fn deliver_held(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, virtio_queue::Error> {
        let Some(len) = *self.held else {
            return Ok(false);
        };
        let room: usize = if self.mrg {
            self.chains.iter().map(|c| c.capacity).sum()
        } else {
            self.chains.front().map_or(0, |c| c.capacity)
        };
        if room < len {
            return Ok(false);
        }
        let mut off = 0;
        for s in &self.slices[self.pieces(self.chains.len())] {
            if off >= len {
                break;
            }
            let n = s.len().min(len - off);
            // Marks the pages dirty as it writes.
            s.copy_from(&self.bounce[off..off + n]);
            off += n;
        }
        *self.held = None;
        self.metrics.rx_bounced.inc();
        self.publish(queue, mem, len)?;
        Ok(true)
    }

    fn one_frame(&mut self, queue: &mut Queue, mem: &'m M) -> Result<Rx, virtio_queue::Error> {
        if !self.limiter.ready() {
            // The limiter's timer brings the device back.
            return Ok(Rx::Stop);
        }
        let want = match *self.held {
            Some(len) => len,
            None => *self.frame_max + 1,
        };
        self.gather(queue, mem, want)?;
        if *self.broken {
            return Ok(Rx::Stop);
        }
        if self.held.is_some() {
            if self.deliver_held(queue, mem)? {
                return Ok(Rx::Delivered);
            }
            if !self.mrg {
                if let Some(c) = self.chains.front() {
                    // One chain per frame, and this one is too small: the
                    // frame can never be delivered.
                    let _ = c;
                    *self.held = None;
                    self.metrics.rx_dropped_too_big.inc();
                    return Ok(Rx::Again);
                }
            }
            return self.wait_for_buffers(queue, mem);
        }
        if self.chains.is_empty() {
            return self.wait_for_buffers(queue, mem);
        }
        // The chains that hold the largest expected frame.
        let frame_max = *self.frame_max;
        let mut k = 0;
        let mut room = 0usize;
        // One byte more than the largest frame: the kernel cuts a frame
        // that does not fit without saying so, and a read that fills the
        // buffers is how a larger frame shows.
        for c in &self.chains {
            if room > frame_max || (!self.mrg && k == 1) {
                break;
            }
            room += c.capacity;
            k += 1;
        }
        let range = self.pieces(k);
        if room > frame_max && range.len() <= MAX_IOV {
            // Straight into guest memory.
            self.iov.clear();
            self.iov
                .extend(self.slices[range.clone()].iter().map(iovec_of));
            // SAFETY: every iovec is a slice of guest memory, mapped while
            // `mem` is borrowed; the kernel writes at most their lengths.
            let read = unsafe { self.tap.readv(&self.iov) };
            match read {
                Ok(Some(n)) if n >= room => {
                    // Larger than expected (the MTU grew): the kernel cut
                    // it. Expect the largest frames from now on.
                    self.metrics.rx_truncated.inc();
                    crate::host_warn!(
                        "virtio-net: a frame from the TAP of {n} bytes or more, larger than its MTU said; dropped, and frames up to {MAX_FRAME} bytes expected from now on"
                    );
                    *self.frame_max = MAX_FRAME;
                    Ok(Rx::Again)
                }
                Ok(Some(n)) if n >= VNET_HDR_LEN => {
                    let mut left = n;
                    for s in &self.slices[range] {
                        if left == 0 {
                            break;
                        }
                        let k = left.min(s.len());
                        s.bitmap().mark_dirty(0, k);
                        left -= k;
                    }
                    self.publish(queue, mem, n)?;
                    Ok(Rx::Delivered)
                }
                Ok(Some(n)) => {
                    self.metrics.tap_read_fails.inc();
                    crate::host_warn!(
                        "virtio-net: a {n}-byte read from the TAP, shorter than a header"
                    );
                    Ok(Rx::Again)
                }
                Ok(None) => Ok(Rx::Stop),
                Err(e) => {
                    self.metrics.tap_read_fails.inc();
                    crate::host_warn!("virtio-net: cannot read the TAP: {e}");
                    Ok(Rx::Stop)
                }
            }
        } else {
            // Less room than the largest frame: read into the device's own
            // buffer, then copy if it fits, or hold it until it does.
            let iov = [libc::iovec {
                iov_base: self.bounce.as_mut_ptr().cast(),
                iov_len: self.bounce.len(),
            }];
            // SAFETY: the bounce buffer is ours and MAX_FRAME bytes long.
            match unsafe { self.tap.readv(&iov) } {
                Ok(Some(n)) if n >= VNET_HDR_LEN => {
                    *self.held = Some(n);
                    if self.deliver_held(queue, mem)? {
                        return Ok(Rx::Delivered);
                    }
                    if !self.mrg {
                        *self.held = None;
                        self.metrics.rx_dropped_too_big.inc();
                        crate::guest_warn!("virtio-net: dropped a {n}-byte frame larger than the guest's receive buffer");
                        return Ok(Rx::Again);
                    }
                    self.wait_for_buffers(queue, mem)
                }
                Ok(Some(_)) => {
                    self.metrics.tap_read_fails.inc();
                    Ok(Rx::Again)
                }
                Ok(None) => Ok(Rx::Stop),
                Err(e) => {
                    self.metrics.tap_read_fails.inc();
                    crate::host_warn!("virtio-net: cannot read the TAP: {e}");
                    Ok(Rx::Stop)
                }
            }
        }
    }

    /// Out of buffers: asks the driver for a notification when it adds
    /// some, and goes on if it already has.
    fn wait_for_buffers(&mut self, queue: &mut Queue, mem: &M) -> Result<Rx, virtio_queue::Error> {
        // Ask for a notification past every chain seen (popped ones
        // included), then give the popped ones back.
        let more = queue.enable_notification(mem)?;
        self.rewind(queue);
        if more {
            queue.disable_notification(mem)?;
            return Ok(Rx::Again);
        }
        self.metrics.rx_no_buffers.inc();
        Ok(Rx::Stop)
    }
}

/// Writes `bytes` at `offset` across `slices` (marking the pages dirty).
fn write_at<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>], mut offset: usize, mut bytes: &[u8]) {
    for s in slices {
        if bytes.is_empty() {
            return;
        }
        if offset >= s.len() {
            offset -= s.len();
            continue;
        }
        let n = bytes.len().min(s.len() - offset);
        if let Ok(sub) = s.subslice(offset, n) {
            sub.copy_from(&bytes[..n]);
        }
        bytes = &bytes[n..];
        offset = 0;
    }
}

impl<M: GuestMemoryBackend + Send + 'static> Net<M> {
    /// Sets the link status the guest sees (a configuration change
    /// interrupt tells a running driver). While the link is down, frames
    /// the guest sends are dropped and none are received.
    pub fn set_link(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        if let Some(ctx) = &self.common.active {
            ctx.interrupt.signal_config_change();
        }
        if up {
            let _ = self.kick.write(1);
        }
    }
}

impl<M: GuestMemoryBackend + Send + 'static> VirtioDevice<M> for Net<M> {
    fn common(&self) -> &VirtioCommon<M> {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon<M> {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError> {
        let offloads = tap_offloads(ctx.acked_features);
        self.tap
            .set_offload(offloads)
            .map_err(|e| ActivateError::Setup(Box::new(e)))?;
        self.held = None;
        self.frame_max = if offloads & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            MAX_FRAME
        } else {
            // Ethernet header, a VLAN tag, the MTU.
            (VNET_HDR_LEN + 18 + self.mtu).min(MAX_FRAME)
        };
        self.common.activate(ctx)?;
        // Frames may already wait in the TAP, before any edge is seen.
        let _ = self.kick.write(1);
        Ok(())
    }

    fn reset(&mut self) -> Option<ActivationContext<M>> {
        self.held = None;
        self.common.reset()
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX => {
                self.metrics.rx_queue_event_count.inc();
                self.receive();
                false
            }
            TX => {
                self.metrics.tx_queue_event_count.inc();
                self.transmit()
            }
            _ => false,
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![
            self.tap.as_raw_fd(),
            self.rx_limiter.timer_fd(),
            self.tx_limiter.timer_fd(),
            self.kick.as_raw_fd(),
        ]
    }

    fn event_edge_triggered(&self, index: usize) -> bool {
        index == EV_TAP
    }

    fn process_event(&mut self, index: usize) {
        match index {
            EV_TAP => self.receive(),
            EV_RX_LIMITER => {
                self.rx_limiter.timer_fired();
                self.receive();
            }
            EV_TX_LIMITER => {
                self.tx_limiter.timer_fired();
                if self.transmit() {
                    let _ = self.kick.write(1);
                }
            }
            EV_KICK => {
                let _ = self.kick.read();
                if self.transmit() {
                    let _ = self.kick.write(1);
                }
                self.receive();
            }
            _ => {}
        }
    }

    fn save_device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(NetState {
            mac: self.mac,
            link_up: self.link_up,
        })
        .ok()
    }

    fn restore_device_state(
        &mut self,
        state: Option<&serde_json::Value>,
    ) -> Result<(), RestoreError> {
        let st: NetState = decode_device_state("virtio-net", state)?;
        if st.mac != self.mac {
            return Err(RestoreError::mismatch(
                "MAC address",
                format!("{:?}", st.mac),
                format!("{:?}", self.mac),
            ));
        }
        self.link_up = st.link_up;
        Ok(())
    }
}
