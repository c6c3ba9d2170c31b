//! The device event loop: an event-manager epoll loop on its own thread, where
//! queue notifications and device events are handled (never on vCPU threads).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// A running event loop.
pub struct EventLoop {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts a loop thread serving `subscribers`.
    pub fn spawn(subscribers: Vec<Subscriber>) -> io::Result<Self> {
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_evt = stop_evt.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || {
                let mut em = match EventManager::<Subscriber>::new() {
                    Ok(em) => em,
                    Err(e) => {
                        log::error!("event loop: cannot create the epoll loop: {e:?}");
                        return;
                    }
                };
                let stop = Arc::new(AtomicBool::new(false));
                em.add_subscriber(Box::new(Stopper {
                    evt: thread_evt,
                    stop: stop.clone(),
                }));
                for s in subscribers {
                    em.add_subscriber(s);
                }
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = em.run() {
                        log::error!("event loop: {e:?}");
                        break;
                    }
                }
            })?;
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
    use std::time::Duration;

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
        let el = EventLoop::spawn(vec![Box::new(Echo {
            evt: evt.try_clone().unwrap(),
            tx,
        })])
        .unwrap();
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
