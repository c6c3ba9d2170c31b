//! virtio-rng (virtio 1.2, 5.4): entropy from the host's `getrandom`.
//!
//! Each request is answered with at most [`MAX_RNG_REQUEST`] bytes, whatever
//! the size of the buffers the driver offers, so one chain cannot make the
//! host draw unbounded entropy or memory.

use std::io::Write;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

use serde::{Deserialize, Serialize};

use crate::metrics::EntropyMetrics;
use crate::persist::{Persist, RestoreError};

use super::{
    read_config_bytes, VirtioCommon, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes written for one request.
pub const MAX_RNG_REQUEST: usize = 64 * 1024;
const CHUNK: usize = 4096;

/// Fills `buf` from the kernel's CSPRNG.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// An entropy device.
pub struct Rng<M> {
    common: VirtioCommon<M>,
    buf: Vec<u8>,
    broken_chains: u64,
    metrics: Arc<EntropyMetrics>,
}

impl<M> Default for Rng<M> {
    fn default() -> Self {
        Self {
            common: VirtioCommon::new(
                TYPE_RNG,
                VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
                &[RNG_QUEUE_SIZE],
            ),
            buf: vec![0; CHUNK],
            broken_chains: 0,
            metrics: Arc::default(),
        }
    }
}

impl<M> Rng<M> {
    /// An inactive entropy device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Chains with buffers outside guest memory.
    pub fn broken_chains(&self) -> u64 {
        self.broken_chains
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<EntropyMetrics> {
        self.metrics.clone()
    }
}

fn answer<M: GuestMemoryBackend>(
    metrics: &EntropyMetrics,
    buf: &mut [u8],
    mem: &M,
    chain: DescriptorChain<&M>,
) -> Option<u32> {
    let mut w = chain.writer(mem).ok()?;
    let total = w.available_bytes().min(MAX_RNG_REQUEST);
    let mut done = 0;
    while done < total {
        let n = (total - done).min(buf.len());
        if fill_random(&mut buf[..n]).is_err() {
            log::error!("virtio-rng: getrandom failed");
            metrics.host_rng_fails.inc();
            break;
        }
        if w.write_all(&buf[..n]).is_err() {
            break;
        }
        done += n;
    }
    metrics.entropy_event_count.inc();
    metrics.entropy_bytes.add(done as u64);
    Some(done as u32)
}

/// The saved state of an [`Rng`]: it keeps nothing between requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {}

impl<M> Persist for Rng<M> {
    type State = RngState;
    type Args = ();
    type Error = RestoreError;

    fn save(&self) -> RngState {
        RngState {}
    }

    fn restore((): (), _state: &RngState) -> Result<Self, RestoreError> {
        Ok(Self::new())
    }
}

impl<M: GuestMemoryBackend + Send + 'static> VirtioDevice<M> for Rng<M> {
    fn common(&self) -> &VirtioCommon<M> {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon<M> {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let buf = &mut self.buf;
        let metrics = &*self.metrics;
        let done = self.common.drain(index, "virtio-rng", |mem, chain| {
            answer(metrics, buf, mem, chain)
        });
        self.broken_chains += done.broken_chains;
        metrics.entropy_event_fails.add(done.broken_chains);
        done.more
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{context, memory, Buf, Driver};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0x1000, 16);
        let mut rng = Rng::new();
        let (ctx, intr) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
        rng.activate(ctx).unwrap();
        driver.add(&[Buf(0x10_0000, 64, true), Buf(0x10_1000, 64, true)]);
        rng.process_queue(0);
        assert_eq!(driver.used(0), (0, 128));
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
        assert!(
            a.iter().any(|&x| x != 0) && a != b,
            "random, not zeros or copies"
        );
        assert_eq!(intr.used_count(), 1);
    }

    #[test]
    fn requests_are_capped_and_readable_buffers_untouched() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0x1000, 16);
        let mut rng = Rng::new();
        let (ctx, _) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
        rng.activate(ctx).unwrap();
        mem.write_slice(&[0x42; 16], GuestAddress(0x20_0000))
            .unwrap();
        driver.add(&[Buf(0x20_0000, 16, false), Buf(0x30_0000, 1 << 20, true)]);
        rng.process_queue(0);
        assert_eq!(driver.used(0).1 as usize, MAX_RNG_REQUEST);
        let mut tail = [0u8; 64];
        mem.read_slice(&mut tail, GuestAddress(0x30_0000 + MAX_RNG_REQUEST as u64))
            .unwrap();
        assert_eq!(tail, [0; 64], "nothing past the cap is written");
        let mut ro = [0u8; 16];
        mem.read_slice(&mut ro, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(ro, [0x42; 16]);
    }

    #[test]
    fn buffers_outside_memory_ask_for_a_reset() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0x1000, 16);
        let mut rng = Rng::new();
        let (ctx, intr) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
        rng.activate(ctx).unwrap();
        driver.add(&[Buf(u64::MAX - 8, 64, true)]);
        rng.process_queue(0);
        assert_eq!(driver.used(0).1, 0);
        assert!(intr.needs_reset());
        assert_eq!(rng.broken_chains(), 1);
    }
}
