//! Draining a queue: pop chains, let the device handle each, publish used
//! entries, and notify the driver as `EVENT_IDX` says.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::VirtioInterrupt;

/// How many chains one call of [`drain_queue`] handles before it yields, so a
/// driver that keeps refilling a queue cannot hold the event loop.
#[derive(Clone, Copy, Debug)]
pub struct QueueBudget(pub usize);

impl QueueBudget {
    /// Four times the queue size: enough to drain a full queue while the
    /// driver refills it, bounded all the same.
    pub fn for_queue(q: &Queue) -> Self {
        Self(4 * usize::from(q.size().max(1)))
    }
}

/// What a handler of [`drain_queue_until`] did with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Answered, with this many bytes written into its buffers.
    Used(u32),
    /// Not now (a rate limiter said wait): the chain goes back to the
    /// queue, to be taken again first, and the pass ends.
    Later,
}

/// Handles every available chain of `q` with `handle`, which returns the
/// number of bytes it wrote into the chain's buffers. Returns `Ok(true)` when
/// the budget ran out with chains left (the caller should come back), and an
/// error when the driver broke the ring (the device should then ask for a
/// reset).
pub fn drain_queue<M, F>(
    q: &mut Queue,
    mem: &M,
    interrupt: &dyn VirtioInterrupt,
    budget: QueueBudget,
    mut handle: F,
) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemoryBackend,
    F: FnMut(DescriptorChain<&M>) -> u32,
{
    drain_queue_until(q, mem, interrupt, budget, |c| Step::Used(handle(c)))
}

/// [`drain_queue`] with a handler that may put a chain back for later
/// ([`Step::Later`]): the pass then ends with notifications still
/// suppressed (whoever said "later" brings the device back, a limiter's
/// timer say) and returns `Ok(false)`.
pub fn drain_queue_until<M, F>(
    q: &mut Queue,
    mem: &M,
    interrupt: &dyn VirtioInterrupt,
    budget: QueueBudget,
    mut handle: F,
) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemoryBackend,
    F: FnMut(DescriptorChain<&M>) -> Step,
{
    let mut done = 0usize;
    let mut more = false;
    let mut result = Ok(());
    'outer: loop {
        if let Err(e) = q.disable_notification(mem) {
            result = Err(e);
            break;
        }
        loop {
            if done >= budget.0 {
                more = true;
                break 'outer;
            }
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    result = Err(e);
                    break 'outer;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = match handle(chain) {
                Step::Used(len) => len,
                Step::Later => {
                    q.go_to_previous_position();
                    break 'outer;
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                result = Err(e);
                break 'outer;
            }
            done += 1;
        }
        match q.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if done > 0 {
        match q.needs_notification(mem) {
            Ok(true) => interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => {
                // Tell the driver anyway: a lost notification hangs it.
                interrupt.signal_used_queue();
                result = result.and(Err(e));
            }
        }
    }
    result.map(|()| more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{memory, Buf, Driver, TestInterrupt};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_driver_that_refills_forever_is_cut_off_at_the_budget() {
        let mem = memory();
        let mut driver = Driver::new(&mem, 0x1000, 16);
        driver.add(&[Buf(0x10_0000, 8, true)]);
        let mut q = driver.queue();
        let intr = TestInterrupt::default();
        let avail = driver.avail_addr();
        let mut handled = 0usize;
        let budget = QueueBudget::for_queue(&q);
        let more = drain_queue(&mut q, &mem, &intr, budget, |_chain| {
            handled += 1;
            // The driver republishes head 0 as soon as it is consumed.
            let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
            mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
                .unwrap();
            mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
            0
        })
        .unwrap();
        assert!(more, "the caller is told to come back");
        assert_eq!(handled, 4 * 16, "exactly the budget");
        assert_eq!(intr.used_count(), 1, "one notification for the batch");
    }
}
