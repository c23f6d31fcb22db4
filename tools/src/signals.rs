//! SIGTERM and SIGINT as requests to shut down cleanly.
//!
//! Both signals are blocked in the main thread before any other thread
//! starts, so every thread inherits the mask and none is interrupted; one
//! watcher thread takes them with `sigwait`. Nothing runs in signal-handler
//! context, so the reaction may lock, print and remove files, and no
//! `unsafe` is needed. A second signal ends the process at once, for a
//! shutdown that hangs.

use std::sync::{Arc, OnceLock};

use nix::sys::signal::{SigSet, Signal};

/// Why the signals could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("blocking SIGTERM and SIGINT: {0}")]
    Block(#[source] nix::Error),
    #[error("starting the signal thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The first SIGTERM or SIGINT received, if any.
#[derive(Debug, Clone)]
pub struct Termination {
    received: Arc<OnceLock<Signal>>,
}

impl Termination {
    /// Takes over SIGTERM and SIGINT; `react` runs on the watcher thread
    /// after the first one is recorded. Call it before any other thread
    /// starts: a thread started earlier keeps its default handling.
    pub fn install(react: impl Fn(Signal) + Send + 'static) -> Result<Self, SignalError> {
        Self::install_saying("shutting down", react)
    }

    /// Like [`Termination::install`], printing `doing` (what the first
    /// signal does) beside the signal's name.
    pub fn install_saying(
        doing: &'static str,
        react: impl Fn(Signal) + Send + 'static,
    ) -> Result<Self, SignalError> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().map_err(SignalError::Block)?;
        let received = Arc::new(OnceLock::new());
        let seen = received.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || watch(&set, &seen, doing, react))
            .map_err(SignalError::Thread)?;
        Ok(Self { received })
    }

    /// The signal received, once one was.
    pub fn received(&self) -> Option<Signal> {
        self.received.get().copied()
    }
}

fn watch(set: &SigSet, seen: &OnceLock<Signal>, doing: &str, react: impl Fn(Signal)) {
    while let Ok(sig) = set.wait() {
        if seen.set(sig).is_err() {
            eprintln!("second {sig}: exiting at once");
            std::process::exit(1);
        }
        eprintln!("{sig}: {doing}");
        react(sig);
    }
}
