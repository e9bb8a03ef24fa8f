//! Graceful shutdown of one serving thread's connections: a signal every
//! connection listens for, and a wait until the last one has finished.
//!
//! hyper-util's `GracefulShutdown` only watches hyper's own connection
//! types; a connection here is a loop (an HTTP/1 connection parks between
//! requests and is served by a new hyper connection when the next one
//! arrives), so it listens itself.

use tokio::sync::watch;

/// The serving thread's side: tells every connection to finish, then
/// waits until all of them have.
#[derive(Debug)]
pub(super) struct Drain {
    tx: watch::Sender<()>,
}

/// A connection's side: whether it has been told to finish. Held for the
/// connection's whole life; [`Drain::drain`] waits until every one is
/// dropped.
#[derive(Debug)]
pub(super) struct Shutdown {
    /// True once the signal has been received.
    is_shutdown: bool,
    notify: watch::Receiver<()>,
}

/// See [`Shutdown::peek`]. Held no longer than its `Shutdown`: the drain
/// waits for it too.
#[derive(Debug)]
pub(super) struct Peek(watch::Receiver<()>);

impl Peek {
    /// True once the signal has been sent (or the serving thread is gone).
    pub(super) fn sent(&self) -> bool {
        self.0.has_changed().unwrap_or(true)
    }
}

impl Drain {
    pub(super) fn new() -> Drain {
        Drain {
            tx: watch::channel(()).0,
        }
    }

    /// A listener for a new connection.
    pub(super) fn shutdown(&self) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify: self.tx.subscribe(),
        }
    }

    /// Tells every connection to finish and waits until all have.
    pub(super) async fn drain(self) {
        // No receiver left is fine: nothing to wait for then.
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

impl Shutdown {
    /// True once the signal has been received.
    pub(super) fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// A look at whether the signal has been sent, without waiting: for a
    /// loop that polls [`Shutdown::recv`] only when it may be ready.
    pub(super) fn peek(&self) -> Peek {
        Peek(self.notify.clone())
    }

    /// Waits for the signal (returns at once if it was received before).
    pub(super) async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // An error means the serving thread is gone: finish as well.
        let _ = self.notify.changed().await;
        self.is_shutdown = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn peek_sees_the_signal_and_a_gone_serving_thread() {
        let drain = Drain::new();
        let shutdown = drain.shutdown();
        let peek = shutdown.peek();
        assert!(!peek.sent());
        let draining = tokio::spawn(drain.drain());
        tokio::task::yield_now().await;
        assert!(peek.sent());
        // The drain waits for the peek too, as for its connection.
        assert!(!draining.is_finished());
        drop((peek, shutdown));
        draining.await.unwrap();

        // No drain at all (the serving thread dropped it): sent as well.
        let drain = Drain::new();
        let shutdown = drain.shutdown();
        drop(drain);
        assert!(shutdown.peek().sent());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_signals_every_connection_and_waits_for_the_last() {
        let drain = Drain::new();
        let mut early = drain.shutdown();
        let mut late = drain.shutdown();
        assert!(!early.is_shutdown());
        // Nothing signalled yet: the wait does not return.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), early.recv())
                .await
                .is_err()
        );
        let finished = tokio::spawn(async move {
            early.recv().await;
            assert!(early.is_shutdown());
            // A second wait returns at once.
            early.recv().await;
            drop(early);
            late.recv().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(late);
            tokio::time::Instant::now()
        });
        let started = tokio::time::Instant::now();
        drain.drain().await;
        // The drain returned only when the last listener was dropped.
        assert!(tokio::time::Instant::now() - started >= Duration::from_secs(5));
        let dropped_at = finished.await.unwrap();
        assert!(dropped_at <= tokio::time::Instant::now());
    }
}
