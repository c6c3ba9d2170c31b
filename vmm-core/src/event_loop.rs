//! The device event loop: an event-manager epoll loop on its own thread, where
//! queue notifications and device events are handled (never on vCPU threads).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{spawn_confined, SpawnError};

/// How long the loop keeps polling after an event before it sleeps.
pub const POLL_WINDOW: Duration = Duration::from_micros(50);

/// Rounds of pending events a stopping loop still handles.
const DRAIN_ROUNDS: usize = 64;

/// A subscriber the loop can own.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Orders for the loop thread.
enum Command {
    /// Stop handling events until `Resume`; acknowledge once quiet.
    Pause(SyncSender<()>),
    /// Handle events again.
    Resume,
    /// End the loop.
    Stop,
}

/// The loop's own subscriber: reads orders when its eventfd is written.
struct Control {
    wake: EventFd,
    commands: Receiver<Command>,
    stop: Arc<AtomicBool>,
}

impl Control {
    fn obey(&mut self, cmd: Command) {
        match cmd {
            Command::Stop => self.stop.store(true, Ordering::SeqCst),
            Command::Resume => {}
            Command::Pause(ack) => {
                let _ = ack.send(());
                // Quiet: nothing else runs on this thread until told.
                loop {
                    match self.commands.recv() {
                        Ok(Command::Resume) => return,
                        Ok(Command::Pause(ack)) => {
                            let _ = ack.send(());
                        }
                        Ok(Command::Stop) | Err(_) => {
                            self.stop.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(cmd) = self.commands.try_recv() {
            self.obey(cmd);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("event loop: cannot watch its control event: {e:?}");
        }
    }
}

/// Why the event loop could not start or obey.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Its control eventfd could not be created.
    #[error("cannot create the event loop's eventfd")]
    EventFd(#[source] io::Error),
    /// The epoll instance could not be created.
    #[error("cannot create the event loop's epoll instance: {0:?}")]
    Epoll(event_manager::Error),
    /// Its thread could not start.
    #[error("cannot start the event loop thread")]
    Spawn(#[from] SpawnError),
    /// The loop did not acknowledge a pause in time (a device handler is
    /// stuck) or is gone.
    #[error("the event loop did not pause within {0:?}")]
    PauseTimeout(Duration),
}

/// A running event loop.
pub struct EventLoop {
    wake: EventFd,
    commands: Sender<Command>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl EventLoop {
    /// Starts a loop thread serving `subscribers`, confined by `filter`
    /// when given. The epoll instance is created and the subscribers
    /// registered before the thread starts.
    pub fn spawn(
        subscribers: Vec<Subscriber>,
        filter: Option<BpfProgram>,
    ) -> Result<Self, EventLoopError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
        let (commands, rx) = channel();
        let mut em = EventManager::<Subscriber>::new().map_err(EventLoopError::Epoll)?;
        let stop = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Box::new(Control {
            wake: wake.try_clone().map_err(EventLoopError::EventFd)?,
            commands: rx,
            stop: stop.clone(),
        }));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let thread = spawn_confined("event-loop".into(), filter, move || {
            // After each event, keep polling (epoll with no timeout) for
            // POLL_WINDOW before sleeping: a driver waiting for its answer
            // usually notifies again within microseconds, and a thread that
            // is awake sees it without a scheduler wake-up.
            let mut last_event = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let polling = last_event.elapsed() < POLL_WINDOW;
                let result = if polling {
                    em.run_with_timeout(0)
                } else {
                    em.run()
                };
                match result {
                    Ok(0) => std::hint::spin_loop(),
                    Ok(_) => last_event = Instant::now(),
                    Err(e) => {
                        log::error!("event loop: {e:?}");
                        return;
                    }
                }
            }
            // Stopping: the vCPUs are out of the guest by now, so no new
            // work comes; finish what was notified before the stop (a disk
            // request the guest is waiting for), within a bound.
            for _ in 0..DRAIN_ROUNDS {
                match em.run_with_timeout(0) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })?;
        Ok(Self {
            wake,
            commands,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) {
        // A closed channel means the thread is gone already.
        let _ = self.commands.send(cmd);
        let _ = self.wake.write(1);
    }

    /// Stops handling events (the handler running now finishes first) and
    /// returns once the loop is quiet, or fails after `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), EventLoopError> {
        let (ack, acked) = sync_channel(1);
        self.send(Command::Pause(ack));
        acked
            .recv_timeout(timeout)
            .map_err(|_| EventLoopError::PauseTimeout(timeout))
    }

    /// Handles events again after [`EventLoop::pause`].
    pub fn resume(&self) {
        self.send(Command::Resume);
    }

    /// Stops the loop (paused or not) and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Echo {
        evt: EventFd,
        tx: Sender<u64>,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            if let Ok(v) = self.evt.read() {
                let _ = self.tx.send(v);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn events_are_handled_on_the_loop_thread_until_paused_or_stopped() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        // Confined: the loop's own filter must let it serve events.
        let echo = Echo {
            evt: evt.try_clone().unwrap(),
            tx,
        };
        let filter = crate::seccomp::program(crate::seccomp::ThreadKind::EventLoop).unwrap();
        let el = EventLoop::spawn(vec![Box::new(echo)], Some(filter)).unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        el.pause(Duration::from_secs(5)).unwrap();
        evt.write(4).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "nothing is handled while paused"
        );
        el.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 4);
        el.pause(Duration::from_secs(5)).unwrap();
        el.stop();
        evt.write(1).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "no handling after stop"
        );
    }
}
