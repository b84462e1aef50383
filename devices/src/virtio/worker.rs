//! A device's worker thread: an event-manager loop that serves the device's
//! queues (and any backend fds) until the device is reset or dropped.

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Ends the loop when its eventfd fires.
struct StopWatch {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("worker: cannot watch its stop event: {e:?}");
        }
    }
}

/// What each new worker thread runs before it serves anything, given its
/// name: veil puts the thread under its seccomp filter there. An error
/// leaves the device unserved rather than unsandboxed.
pub type StartHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static START_HOOK: OnceLock<StartHook> = OnceLock::new();

/// Sets the hook every worker thread runs first; only the first call of a
/// process counts, since a sandbox is the process's policy.
pub fn set_start_hook(hook: StartHook) {
    let _ = START_HOOK.set(hook);
}

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `handler` on a new thread named `name`.
    pub fn spawn<S: MutEventSubscriber + Send + 'static>(name: &str, handler: S) -> std::io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let watch = StopWatch {
            evt: stop.try_clone()?,
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            if let Some(hook) = START_HOOK.get() {
                if let Err(e) = hook(&thread_name) {
                    return log::error!("{thread_name}: not serving its queues: {e}");
                }
            }
            let stopped = watch.stopped.clone();
            let mut manager = match EventManager::<Box<dyn MutEventSubscriber>>::new() {
                Ok(m) => m,
                Err(e) => return log::error!("worker: cannot create its event loop: {e:?}"),
            };
            manager.add_subscriber(Box::new(watch));
            manager.add_subscriber(Box::new(handler));
            while !stopped.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    log::error!("worker: event loop failed: {e:?}");
                    break;
                }
            }
        })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for it; the handler is dropped with it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
