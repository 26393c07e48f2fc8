//! Shutdown signalling between the manager and its background tasks (after mini-redis's
//! `shutdown.rs`): one sender, any number of listeners, and a flag the hot path can read
//! without waiting.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Owned by the manager: closing it tells every task to finish.
pub(crate) struct Shutdown {
    closed: AtomicBool,
    signal: watch::Sender<bool>,
    done: watch::Sender<bool>,
}

impl Shutdown {
    pub(crate) fn new() -> Shutdown {
        Shutdown {
            closed: AtomicBool::new(false),
            signal: watch::channel(false).0,
            done: watch::channel(false).0,
        }
    }

    /// True once shutdown has begun; public operations then return `Error::ShutDown`.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Begin shutdown; true for the one caller that did it, false for later ones.
    pub(crate) fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        if first {
            self.signal.send_replace(true);
        }
        first
    }

    /// A handle a task awaits to learn that shutdown has begun.
    pub(crate) fn subscribe(&self) -> Signal {
        Signal(self.signal.subscribe())
    }

    /// Called by the caller that began shutdown once everything has stopped.
    pub(crate) fn mark_done(&self) {
        self.done.send_replace(true);
    }

    /// Resolves once shutdown has completed.
    pub(crate) async fn wait_done(&self) {
        let mut done = self.done.subscribe();
        // The sender lives as long as `self`, so wait_for cannot fail while we borrow it.
        let _ = done.wait_for(|d| *d).await;
    }
}

/// A task's view of the shutdown signal.
pub(crate) struct Signal(watch::Receiver<bool>);

impl Signal {
    /// Resolves once shutdown has begun (immediately if it already has).
    pub(crate) async fn recv(&mut self) {
        // An error means the manager is gone entirely, which also means stop.
        let _ = self.0.wait_for(|closed| *closed).await;
    }
}
