//! How long an HTTP/1 connection has had no request in progress: the
//! service marks requests busy, the framing guard's single timer closes a
//! connection idle for the head timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::wake::Held;

/// Requests in progress on one HTTP/1 connection, and since when there has
/// been none. The service holds a [`Busy`] from a request's arrival until
/// its answer has been written (the guard travels with the response body);
/// [`FramingGuard`](super::guard::FramingGuard) closes a connection that has had no request in progress
/// and no complete head for the head timeout.
///
/// This replaces hyper's own header-read timer, which hyper arms and drops
/// for every request (an allocation, a timer-wheel insert and removal); here
/// a request costs two atomic updates and a clock read, and one timer per
/// connection fires at most once per timeout period.
#[derive(Debug)]
pub struct Activity {
    busy: AtomicUsize,
    /// Nanoseconds since [`clock_base`] when `busy` last dropped to zero.
    idle_since: AtomicU64,
}

/// A request in progress on a connection (see [`Activity`]).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn nanos_since_base(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock_base()).as_nanos()).unwrap_or(u64::MAX)
}

impl Activity {
    /// A connection that starts idle now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(nanos_since_base(Instant::now())),
        })
    }

    /// Marks a request in progress until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// How long the connection has had no request in progress; `None` while
    /// one is.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since.load(Ordering::Acquire);
        Some(Duration::from_nanos(
            nanos_since_base(now).saturating_sub(since),
        ))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Idle from now on if this was the last request in progress.
        self.0
            .idle_since
            .store(nanos_since_base(Instant::now()), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the idle timer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Idle {
    /// Busy, or idle for less than the park time: keep waiting.
    Open,
    /// Idle for the park time: the connection may let go of its HTTP
    /// state and buffers (see [`FramingGuard`](super::guard::FramingGuard)).
    Park,
    /// Idle for the timeout: close the connection.
    Expired,
}

/// The idle check of one connection: a single timer, re-armed lazily.
pub(super) struct IdleTimer {
    pub(super) activity: Arc<Activity>,
    pub(super) timeout: Duration,
    /// Idle time after which the connection parks; `None` never parks.
    pub(super) park_after: Option<Duration>,
    pub(super) sleep: Pin<Box<Sleep>>,
    /// Whether the timer holds this task's waker (and need not be polled
    /// until it fires).
    pub(super) held: Held,
}

impl IdleTimer {
    /// Whether the connection has been idle for the timeout, or (when
    /// `armed`, and `may_park` now) for the park time; otherwise makes sure
    /// the task is woken when it could be.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, armed: bool, may_park: bool) -> Idle {
        // The guard asks on every read that waits, twice per request on a
        // busy connection; until the timer fires it has nothing new.
        if self.held.by(cx) && !self.sleep.is_elapsed() {
            return Idle::Open;
        }
        let park = self.park_after.filter(|_| armed);
        loop {
            if self
                .held
                .poll(cx, |cx| self.sleep.as_mut().poll(cx))
                .is_pending()
            {
                return Idle::Open;
            }
            let now = Instant::now();
            let left = |idle: Duration| self.timeout - idle;
            let wait = match self.activity.idle_for(now) {
                Some(idle) if idle >= self.timeout => return Idle::Expired,
                Some(idle) => match park {
                    Some(p) if idle >= p && may_park => {
                        // Parked: woken again when the timeout is up.
                        self.sleep.as_mut().reset(now + left(idle));
                        return Idle::Park;
                    }
                    // Idle long enough, but not ready (an answer still
                    // being flushed): look again a park time later.
                    Some(p) if idle >= p => p.min(left(idle)),
                    Some(p) => p - idle,
                    None => left(idle),
                },
                None => park.unwrap_or(self.timeout),
            };
            self.sleep.as_mut().reset(now + wait);
        }
    }

    /// Starts the park time again: a parked connection became active.
    pub(super) fn unpark(&mut self) {
        if let Some(p) = self.park_after {
            let deadline = (Instant::now() + p).min(self.sleep.deadline());
            self.sleep.as_mut().reset(deadline);
            // Reset outside `poll`: it may have fired since (and let go of
            // the waker), so the next `poll` polls it.
            self.held.forget();
        }
    }
}
