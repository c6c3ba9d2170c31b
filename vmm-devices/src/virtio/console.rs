//! virtio-console with one port (virtio 1.2, 5.3), to a host `Write` and
//! from a host `Read`.
//!
//! Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq)
//! guest output to the host. Host input is pushed through a [`ConsoleInput`]
//! (for example by a thread running [`ConsoleInput::pump`] over stdin) into a
//! buffer of at most [`INPUT_BUFFER_SIZE`] bytes (pushing waits while it is
//! full) and announced on an eventfd; it is handed to the guest as it posts
//! receive buffers. Each transmit chain is copied out up to [`MAX_TX_CHAIN`]
//! bytes.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};

use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemoryBackend, Le16, Le32};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use serde::{Deserialize, Serialize};

use crate::persist::{Persist, RestoreError};

use super::{
    drain_queue, read_config_bytes, QueueBudget, VirtioCommon, VirtioDevice, TYPE_CONSOLE,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of each queue.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Most host input held for the guest.
pub const INPUT_BUFFER_SIZE: usize = 64 * 1024;
/// Most bytes taken from one transmit chain.
pub const MAX_TX_CHAIN: usize = 64 * 1024;
/// `VIRTIO_CONSOLE_F_EMERG_WRITE`: single bytes through the config space.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;
const RX: usize = 0;
const TX: usize = 1;
const CHUNK: usize = 4096;

#[derive(Default)]
struct InputState {
    data: VecDeque<u8>,
    eof: bool,
}

/// Host input waiting for the guest, shared between the device and whoever
/// feeds it.
struct Input {
    shared: Arc<(Mutex<InputState>, Condvar)>,
    evt: EventFd,
}

/// The host's end of a console's input: push bytes in, from any thread.
pub struct ConsoleInput {
    shared: Arc<(Mutex<InputState>, Condvar)>,
    evt: EventFd,
}

impl ConsoleInput {
    /// Queues `bytes` for the guest, waiting while the buffer holds
    /// [`INPUT_BUFFER_SIZE`] bytes. Returns false if the console is gone.
    pub fn push(&self, bytes: &[u8]) -> bool {
        for chunk in bytes.chunks(INPUT_BUFFER_SIZE) {
            let (lock, cvar) = &*self.shared;
            let Ok(mut st) = lock.lock() else {
                return false;
            };
            while st.data.len() + chunk.len() > INPUT_BUFFER_SIZE {
                st = match cvar.wait(st) {
                    Ok(s) => s,
                    Err(_) => return false,
                };
            }
            st.data.extend(chunk);
            drop(st);
            if self.evt.write(1).is_err() {
                return false;
            }
        }
        true
    }

    /// Marks the end of input.
    pub fn close(&self) {
        if let Ok(mut st) = self.shared.0.lock() {
            st.eof = true;
        }
    }

    /// Copies everything from `src` into the console until end of input
    /// (meant to run on a thread of its own).
    pub fn pump<R: Read>(&self, mut src: R) {
        let mut buf = [0u8; CHUNK];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if !self.push(&buf[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.close();
    }
}

/// `struct virtio_console_config` (virtio 1.2, 5.3.4).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct ConsoleConfigSpace {
    /// Columns.
    pub cols: Le16,
    /// Rows.
    pub rows: Le16,
    /// Ports (1: no multiport).
    pub max_nr_ports: Le32,
    /// Emergency write register (the driver writes one byte of output).
    pub emerg_wr: Le32,
}

// SAFETY: little-endian integers at offsets 0, 2, 4 and 8, 12 bytes in all
// with no padding; every bit pattern is a valid value.
unsafe impl ByteValued for ConsoleConfigSpace {}

/// Offset of `emerg_wr` in the configuration space.
const EMERG_WR_OFFSET: u64 = 8;

/// A one-port console.
pub struct Console<M> {
    out: Box<dyn Write + Send>,
    input: Option<Input>,
    config: ConsoleConfigSpace,
    common: VirtioCommon<M>,
    buf: Vec<u8>,
    broken_chains: u64,
}

impl<M> Console<M> {
    /// A console writing guest output to `out`, with no input.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        let config = ConsoleConfigSpace {
            cols: Le16::from(80),
            rows: Le16::from(25),
            max_nr_ports: Le32::from(1),
            emerg_wr: Le32::from(0),
        };
        Self {
            out,
            input: None,
            config,
            common: VirtioCommon::new(
                TYPE_CONSOLE,
                VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_CONSOLE_F_EMERG_WRITE,
                &[CONSOLE_QUEUE_SIZE; 2],
            ),
            buf: vec![0; CHUNK],
            broken_chains: 0,
        }
    }

    /// A console with an input buffer, and the handle that feeds it.
    pub fn with_input(out: Box<dyn Write + Send>) -> std::io::Result<(Self, ConsoleInput)> {
        let mut c = Self::new(out);
        let shared = Arc::new((Mutex::new(InputState::default()), Condvar::new()));
        let evt = EventFd::new(EFD_NONBLOCK)?;
        let handle = ConsoleInput {
            shared: shared.clone(),
            evt: evt.try_clone()?,
        };
        c.input = Some(Input { shared, evt });
        Ok((c, handle))
    }

    /// Another feed for this console's input, if it has one (after a
    /// restore, say).
    pub fn input_handle(&self) -> Option<ConsoleInput> {
        let input = self.input.as_ref()?;
        Some(ConsoleInput {
            shared: input.shared.clone(),
            evt: input.evt.try_clone().ok()?,
        })
    }

    /// Host input waiting for guest buffers.
    pub fn pending_input(&self) -> usize {
        self.input
            .as_ref()
            .and_then(|i| i.shared.0.lock().ok().map(|s| s.data.len()))
            .unwrap_or(0)
    }

    /// Chains with buffers outside guest memory.
    pub fn broken_chains(&self) -> u64 {
        self.broken_chains
    }
}

fn transmit<M: GuestMemoryBackend>(
    out: &mut dyn Write,
    buf: &mut [u8],
    mem: &M,
    chain: DescriptorChain<&M>,
) -> Option<u32> {
    let mut r = chain.reader(mem).ok()?;
    let mut left = r.available_bytes().min(MAX_TX_CHAIN);
    while left > 0 {
        let n = left.min(buf.len());
        if r.read_exact(&mut buf[..n]).is_err() {
            break;
        }
        if let Err(e) = out.write_all(&buf[..n]) {
            crate::host_warn!("virtio-console: {left} bytes of guest output lost: {e}");
            break;
        }
        left -= n;
    }
    let _ = out.flush();
    Some(0)
}

impl<M: GuestMemoryBackend + Send + 'static> Console<M> {
    /// Moves pending host input into posted receive buffers.
    fn receive(&mut self) -> bool {
        let (Some(ctx), Some(input)) = (self.common.active.as_mut(), self.input.as_ref()) else {
            return false;
        };
        let (lock, cvar) = &*input.shared;
        let Ok(mut st) = lock.lock() else {
            return false;
        };
        if st.data.is_empty() {
            return false;
        }
        let mut broken = 0;
        let queue = &mut ctx.queues[RX];
        // Take only chains while there is input: stop as soon as it runs out.
        let mem = &ctx.mem;
        let mut result = Ok(false);
        while !st.data.is_empty() {
            let mut took = false;
            result = drain_queue(
                queue,
                mem,
                ctx.interrupt.as_ref(),
                QueueBudget(1),
                |chain| {
                    took = true;
                    let Ok(mut w) = chain.writer(mem) else {
                        broken += 1;
                        return 0;
                    };
                    let n = w.available_bytes().min(st.data.len());
                    let (a, b) = st.data.as_slices();
                    let first = n.min(a.len());
                    let ok =
                        w.write_all(&a[..first]).is_ok() && w.write_all(&b[..n - first]).is_ok();
                    st.data.drain(..n);
                    if ok {
                        n as u32
                    } else {
                        0
                    }
                },
            );
            if !took || result.is_err() {
                break;
            }
        }
        cvar.notify_all();
        drop(st);
        self.broken_chains += broken;
        ctx.settle("virtio-console", broken, result)
    }
}

/// The saved state of a [`Console`]: host input the guest has not taken
/// yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// Whether the console had an input.
    pub has_input: bool,
    /// Input waiting for receive buffers (at most [`INPUT_BUFFER_SIZE`]).
    pub pending_input: Vec<u8>,
}

impl<M> Persist for Console<M> {
    type State = ConsoleState;
    /// Where guest output goes.
    type Args = Box<dyn Write + Send>;
    type Error = RestoreError;

    fn save(&self) -> ConsoleState {
        let pending = self
            .input
            .as_ref()
            .and_then(|i| {
                i.shared
                    .0
                    .lock()
                    .ok()
                    .map(|s| s.data.iter().copied().collect())
            })
            .unwrap_or_default();
        ConsoleState {
            has_input: self.input.is_some(),
            pending_input: pending,
        }
    }

    /// A console with an input, if it had one, holding the pending bytes
    /// (reach its feed with [`Console::input_handle`]).
    fn restore(out: Box<dyn Write + Send>, state: &ConsoleState) -> Result<Self, RestoreError> {
        check_pending(&state.pending_input)?;
        if !state.has_input {
            if !state.pending_input.is_empty() {
                return Err(RestoreError::invalid(
                    "console pending input",
                    "input without an input side",
                ));
            }
            return Ok(Self::new(out));
        }
        let (mut console, _feed) =
            Self::with_input(out).map_err(|e| RestoreError::Setup(Box::new(e)))?;
        console.put_back_input(&state.pending_input);
        Ok(console)
    }
}

/// Refuses more pending input than a console holds.
fn check_pending(pending: &[u8]) -> Result<(), RestoreError> {
    if pending.len() > INPUT_BUFFER_SIZE {
        return Err(RestoreError::invalid(
            "console pending input",
            format!("{} bytes, at most {INPUT_BUFFER_SIZE}", pending.len()),
        ));
    }
    Ok(())
}

impl<M> Console<M> {
    /// Queues saved host input for the guest again (dropped, with a
    /// warning, if this console has no input side).
    fn put_back_input(&mut self, pending: &[u8]) {
        match &self.input {
            Some(input) => {
                if let Ok(mut st) = input.shared.0.lock() {
                    st.data.extend(pending);
                }
                if !pending.is_empty() {
                    let _ = input.evt.write(1);
                }
            }
            None if !pending.is_empty() => log::warn!(
                "virtio-console: {} bytes of saved input dropped: the restored console has no input",
                pending.len()
            ),
            None => {}
        }
    }
}

impl<M: GuestMemoryBackend + Send + 'static> VirtioDevice<M> for Console<M> {
    fn common(&self) -> &VirtioCommon<M> {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon<M> {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr: one byte of output, whatever the access width.
        if offset == EMERG_WR_OFFSET && !data.is_empty() {
            if let Err(e) = self
                .out
                .write_all(&data[..1])
                .and_then(|()| self.out.flush())
            {
                crate::host_warn!("virtio-console: emergency output lost: {e}");
            }
        }
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX => self.receive(),
            TX => {
                let (out, buf) = (&mut self.out, &mut self.buf);
                let done = self.common.drain(TX, "virtio-console", |mem, chain| {
                    transmit(out.as_mut(), buf, mem, chain)
                });
                self.broken_chains += done.broken_chains;
                done.more
            }
            _ => false,
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        self.input.iter().map(|i| i.evt.as_raw_fd()).collect()
    }

    fn save_device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(Persist::save(self)).ok()
    }

    /// Puts back the host input the guest had not taken yet (dropped, with
    /// a warning, if this console has no input side).
    fn restore_device_state(
        &mut self,
        state: Option<&serde_json::Value>,
    ) -> Result<(), RestoreError> {
        let saved: ConsoleState = crate::virtio::decode_device_state("virtio-console", state)?;
        check_pending(&saved.pending_input)?;
        self.put_back_input(&saved.pending_input);
        Ok(())
    }

    fn process_event(&mut self, _index: usize) {
        if let Some(i) = &self.input {
            let _ = i.evt.read();
        }
        self.receive();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{context, memory, Buf, Driver, TestInterrupt};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn activate<'a>(
        mem: &'a GuestMemoryMmap,
        console: &mut Console<GuestMemoryMmap>,
    ) -> (Driver<'a>, Driver<'a>, Arc<TestInterrupt>) {
        let rx = Driver::new(mem, 0x1000, 16);
        let tx = Driver::new(mem, 0x4000, 16);
        let (ctx, intr) = context(mem, vec![rx.queue(), tx.queue()], VIRTIO_F_VERSION_1);
        console.activate(ctx).unwrap();
        (rx, tx, intr)
    }

    #[test]
    fn transmitted_bytes_reach_the_host_writer() {
        let mem = memory();
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        let (_rx, mut tx, intr) = activate(&mem, &mut c);
        mem.write_slice(b"hello, ", GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"host\n", GuestAddress(0x10_1000)).unwrap();
        tx.add(&[Buf(0x10_0000, 7, false), Buf(0x10_1000, 5, false)]);
        c.process_queue(TX);
        assert_eq!(&*sink.0.lock().unwrap(), b"hello, host\n");
        assert_eq!(tx.used(0), (0, 0));
        assert_eq!(intr.used_count(), 1);
    }

    #[test]
    fn transmit_is_capped_per_chain() {
        let mem = memory();
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        let (_rx, mut tx, _) = activate(&mem, &mut c);
        tx.add(&[Buf(0x10_0000, 1 << 20, false)]);
        c.process_queue(TX);
        assert_eq!(sink.0.lock().unwrap().len(), MAX_TX_CHAIN);
    }

    #[test]
    fn host_input_fills_receive_buffers_in_order() {
        let mem = memory();
        let input: &'static [u8] = b"typed on the host";
        let (mut c, feed) = Console::with_input(Box::new(std::io::sink())).unwrap();
        let (mut rx, _tx, _) = activate(&mem, &mut c);
        let pump = std::thread::spawn(move || feed.pump(input));
        pump.join().unwrap();
        assert_eq!(c.pending_input(), input.len());
        // No buffers yet: the input waits.
        c.process_event(0);
        assert_eq!(c.pending_input(), input.len());
        rx.add(&[Buf(0x20_0000, 5, true)]);
        rx.add(&[Buf(0x20_1000, 64, true)]);
        c.process_queue(RX);
        assert_eq!(rx.used(0), (0, 5));
        assert_eq!(rx.used(1).1, (input.len() - 5) as u32);
        let mut got = vec![0u8; input.len() - 5];
        mem.read_slice(&mut got, GuestAddress(0x20_1000)).unwrap();
        assert_eq!(&got, &input[5..]);
        assert_eq!(c.pending_input(), 0);
    }

    #[test]
    fn input_beyond_the_buffer_waits_for_the_guest() {
        let mem = memory();
        let (mut c, feed) = Console::with_input(Box::new(std::io::sink())).unwrap();
        let (mut rx, _tx, _) = activate(&mem, &mut c);
        let big = vec![b'a'; INPUT_BUFFER_SIZE + 100];
        let pusher = std::thread::spawn(move || feed.push(&big));
        let start = Instant::now();
        while c.pending_input() < INPUT_BUFFER_SIZE {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            c.pending_input(),
            INPUT_BUFFER_SIZE,
            "the buffer never grows past its cap"
        );
        rx.add(&[Buf(0x20_0000, 4096, true)]);
        c.process_queue(RX);
        assert!(
            pusher.join().unwrap(),
            "the rest got in once the guest took some"
        );
    }

    #[test]
    fn emergency_write_and_config() {
        let mem = memory();
        let sink = Sink::default();
        let mut c: Console<GuestMemoryMmap> = Console::new(Box::new(sink.clone()));
        c.write_config(8, &[b'!', 0, 0, 0]);
        assert_eq!(&*sink.0.lock().unwrap(), b"!");
        let mut ports = [0u8; 4];
        c.read_config(4, &mut ports);
        assert_eq!(u32::from_le_bytes(ports), 1);
        let _ = mem;
    }

    #[test]
    fn readable_rx_buffers_and_bad_addresses_do_not_panic() {
        let mem = memory();
        let (mut c, feed) = Console::with_input(Box::new(std::io::sink())).unwrap();
        let (mut rx, mut tx, intr) = activate(&mem, &mut c);
        tx.add(&[Buf(u64::MAX - 4, 64, false)]);
        c.process_queue(TX);
        assert!(intr.needs_reset());
        assert!(feed.push(b"x"));
        rx.add(&[Buf(0x20_0000, 16, false)]);
        c.process_queue(RX);
        assert_eq!(rx.used(0).1, 0, "no writable room: nothing delivered");
    }

    #[test]
    fn pending_input_survives_save_and_restore() {
        let (c, feed) = Console::<GuestMemoryMmap>::with_input(Box::new(Sink::default())).unwrap();
        assert!(feed.push(b"typed ahead"));
        let saved = c.save();
        assert_eq!(saved.pending_input, b"typed ahead");
        let json = serde_json::to_string(&saved).unwrap();
        let back: ConsoleState = serde_json::from_str(&json).unwrap();
        let restored =
            Console::<GuestMemoryMmap>::restore(Box::new(Sink::default()), &back).unwrap();
        assert_eq!(restored.pending_input(), 11);
        let more = restored.input_handle().expect("an input");
        assert!(more.push(b"!"));
        assert_eq!(restored.save().pending_input, b"typed ahead!");
    }

    #[test]
    fn overlong_or_orphan_pending_input_is_refused() {
        let state = ConsoleState {
            has_input: true,
            pending_input: vec![0; INPUT_BUFFER_SIZE + 1],
        };
        assert!(Console::<GuestMemoryMmap>::restore(Box::new(Sink::default()), &state).is_err());
        let state = ConsoleState {
            has_input: false,
            pending_input: vec![1],
        };
        assert!(Console::<GuestMemoryMmap>::restore(Box::new(Sink::default()), &state).is_err());
    }
}
