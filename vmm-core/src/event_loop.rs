//! The device event loop: an event-manager epoll loop on its own thread, where
//! queue notifications and device events are handled (never on vCPU threads).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{spawn_confined, SpawnError, ThreadKind};

/// How long the loop keeps polling after an event before it sleeps.
pub const POLL_WINDOW: Duration = Duration::from_micros(50);

/// A subscriber the loop can own.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch its stop event: {e:?}");
        }
    }
}

/// Why the event loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Its stop eventfd could not be created.
    #[error("cannot create the event loop's eventfd")]
    EventFd(#[source] io::Error),
    /// The epoll instance could not be created.
    #[error("cannot create the event loop's epoll instance: {0:?}")]
    Epoll(event_manager::Error),
    /// Its thread could not start.
    #[error("cannot start the event loop thread")]
    Spawn(#[from] SpawnError),
}

/// A running event loop.
pub struct EventLoop {
    stop_evt: EventFd,
    thread: Option<JoinHandle<Option<()>>>,
}

impl EventLoop {
    /// Starts a loop thread serving `subscribers`, confined by the event
    /// loop's seccomp filter when `confine`. The epoll instance is created
    /// and the subscribers registered before the thread starts.
    pub fn spawn(subscribers: Vec<Subscriber>, confine: bool) -> Result<Self, EventLoopError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?;
        let thread_evt = stop_evt.try_clone().map_err(EventLoopError::EventFd)?;
        let mut em = EventManager::<Subscriber>::new().map_err(EventLoopError::Epoll)?;
        let stop = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Box::new(Stopper {
            evt: thread_evt,
            stop: stop.clone(),
        }));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let thread = spawn_confined(
            "event-loop".into(),
            ThreadKind::EventLoop,
            confine,
            move || {
                // After each event, keep polling (epoll with no timeout)
                // for POLL_WINDOW before sleeping: a driver waiting for its
                // answer usually notifies again within microseconds, and a
                // thread that is awake sees it without a scheduler wake-up.
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
                            break;
                        }
                    }
                }
            },
        )?;
        Ok(Self {
            stop_evt,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop_evt.write(1);
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
    fn events_are_handled_on_the_loop_thread_until_stopped() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        // Confined: the loop's own filter must let it serve events.
        let echo = Echo {
            evt: evt.try_clone().unwrap(),
            tx,
        };
        let el = EventLoop::spawn(vec![Box::new(echo)], true).unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        el.stop();
        evt.write(1).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "no handling after stop"
        );
    }
}
