//! Upstream deadlines on reused timers.
//!
//! Every upstream exchange runs under a deadline. A fresh tokio timer per
//! request is allocated, registered in the runtime's timer wheel on its
//! first `Pending` poll (under the driver's lock) and removed again when
//! dropped. A timer that is still registered can instead be moved to a
//! later deadline with one compare-and-swap: tokio's `Sleep::reset` leaves
//! the wheel entry where it is and moves it only when the old instant
//! comes. Deadlines here are "now + the upstream timeout", each later than
//! the one before, so [`within`] takes a timer from a per-thread stock,
//! resets it, and puts it back when the exchange ends. Callgrind counts
//! ~200 fewer instructions per HTTP/2 request than with
//! `tokio::time::timeout_at` (BENCHMARKS.md, run CE).
//!
//! A timer belongs to the runtime that made it. The stock remembers which
//! runtime that was and is thrown away when a different one asks (tests
//! start one runtime after another on the same thread).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Id};
use tokio::time::{Instant, Sleep};

use crate::wake::Held;

/// At most this many idle timers are kept per thread: more than a serving
/// thread has exchanges in flight at once in any benchmark here (64–512),
/// and small (a timer is about 100 bytes).
const KEEP: usize = 1024;

/// Idle timers of one runtime, on this thread.
struct Stock {
    runtime: Id,
    timers: Vec<Pin<Box<Sleep>>>,
}

thread_local! {
    static STOCK: RefCell<Option<Stock>> = const { RefCell::new(None) };
}

/// `fut`, or `Err(Elapsed)` if it has not finished by `deadline`. Like
/// `tokio::time::timeout_at`, it polls `fut` first, so an answer that is
/// ready at the deadline still counts. Panics outside a tokio runtime, as
/// tokio's own timers do.
pub fn within<F: Future>(deadline: Instant, fut: F) -> Within<F> {
    Within {
        fut,
        timer: Timer::at(deadline),
        held: Held::default(),
    }
}

pin_project_lite::pin_project! {
    /// The future [`within`] returns. A struct rather than an `async fn`:
    /// that would move `fut`, an exchange of a few hundred bytes, once more.
    pub struct Within<F> {
        #[pin]
        fut: F,
        timer: Timer,
        // The timer holds this task's waker: skip it until it fires.
        held: Held,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let sleep = this.timer.sleep();
        if this.held.by(cx) && !sleep.is_elapsed() {
            return Poll::Pending;
        }
        this.held
            .poll(cx, |cx| sleep.poll(cx))
            .map(|()| Err(Elapsed))
    }
}

/// The deadline passed before the future finished (the caller turns it
/// into its own error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// A timer from the stock, put back when dropped.
struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    runtime: Id,
}

impl Timer {
    /// A timer that fires at `deadline`: a reused one when this thread
    /// has one of the current runtime's, else a new one. Panics outside a
    /// tokio runtime, as tokio's own timers do.
    fn at(deadline: Instant) -> Timer {
        let runtime = Handle::current().id();
        let reused = STOCK.with_borrow_mut(|stock| match stock {
            Some(s) if s.runtime == runtime => s.timers.pop(),
            _ => {
                *stock = Some(Stock {
                    runtime,
                    timers: Vec::new(),
                });
                None
            }
        });
        let sleep = match reused {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Timer {
            sleep: Some(sleep),
            runtime,
        }
    }

    fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.sleep
            .as_mut()
            .expect("a timer has its sleep until dropped")
            .as_mut()
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        // `try_with`: during thread exit the stock may be gone already; the
        // timer is then dropped like any other.
        let _ = STOCK.try_with(|stock| {
            if let Ok(mut stock) = stock.try_borrow_mut()
                && let Some(s) = stock.as_mut()
                && s.runtime == self.runtime
                && s.timers.len() < KEEP
            {
                s.timers.push(sleep);
            }
        });
    }
}

/// How many idle timers this thread keeps (tests).
#[cfg(test)]
fn stocked() -> usize {
    STOCK.with_borrow(|s| s.as_ref().map_or(0, |s| s.timers.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use std::time::Duration;

    fn paused() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Asserts that `within(now + secs, pending())` gives up after exactly
    /// `secs` on the paused clock, and that its timer then waits in the
    /// stock, alone.
    async fn gives_up_after(secs: u64) {
        let start = Instant::now();
        let out = within(start + Duration::from_secs(secs), pending::<()>()).await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_secs(secs));
        assert_eq!(stocked(), 1);
    }

    /// A future that is ready at once, under a deadline `secs` away: its
    /// timer goes back to the stock still registered for that deadline.
    async fn done_at_once(secs: u64) {
        let out = within(Instant::now() + Duration::from_secs(secs), async { 7 }).await;
        assert_eq!(out, Ok(7));
        assert_eq!(stocked(), 1);
    }

    #[test]
    fn a_reused_timer_fires_at_its_new_deadline() {
        paused().block_on(async {
            gives_up_after(10).await;
            // The same timer, moved to a later deadline.
            gives_up_after(10).await;
        });
    }

    #[test]
    fn an_earlier_deadline_than_the_last_one_is_kept() {
        paused().block_on(async {
            done_at_once(30).await;
            // A shorter timeout (a reload) on that timer fires at +1 s.
            gives_up_after(1).await;
        });
    }

    #[test]
    fn a_timer_that_fired_in_the_stock_works_again() {
        paused().block_on(async {
            done_at_once(1).await;
            // Its old deadline passes while nobody uses it.
            tokio::time::sleep(Duration::from_secs(5)).await;
            gives_up_after(2).await;
        });
    }

    #[test]
    fn an_answer_ready_at_the_deadline_counts() {
        paused().block_on(async {
            let deadline = Instant::now() + Duration::from_secs(3);
            let out = within(deadline, tokio::time::sleep_until(deadline)).await;
            assert_eq!(out, Ok(()));
        });
    }

    #[test]
    fn a_later_deadline_does_not_fire_early() {
        paused().block_on(async {
            let start = Instant::now();
            let out = within(
                start + Duration::from_secs(5),
                tokio::time::sleep(Duration::from_secs(4)),
            )
            .await;
            assert_eq!(out, Ok(()));
            assert_eq!(start.elapsed(), Duration::from_secs(4));
        });
    }

    #[test]
    fn timers_of_an_ended_runtime_are_not_reused() {
        // Two runtimes one after the other on this thread, as `#[tokio::test]`s
        // run with `--test-threads 1`: a timer of the first would panic when
        // polled under the second.
        paused().block_on(gives_up_after(1));
        // The first runtime's timer is still in the stock when the second
        // asks for one.
        assert_eq!(stocked(), 1);
        paused().block_on(gives_up_after(3));
    }

    #[test]
    fn the_stock_is_bounded() {
        paused().block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut many: Vec<_> = (0..KEEP + 10)
                .map(|_| Box::pin(within(deadline, pending::<()>())))
                .collect();
            // Poll each once, so each holds a registered timer.
            std::future::poll_fn(|cx| {
                for w in &mut many {
                    assert!(w.as_mut().poll(cx).is_pending());
                }
                Poll::Ready(())
            })
            .await;
            drop(many);
            assert_eq!(stocked(), KEEP);
        });
    }

    #[test]
    fn a_stocked_timer_firing_after_its_task_ended_is_harmless() {
        // The timer goes back holding the waker of the task that used it
        // last; when its old deadline passes unused, that task gets one
        // spurious wake, which a finished task ignores.
        paused().block_on(async {
            let done = tokio::spawn(async {
                within(Instant::now() + Duration::from_secs(1), async {}).await
            })
            .await
            .unwrap();
            assert_eq!(done, Ok(()));
            tokio::time::sleep(Duration::from_secs(2)).await;
            gives_up_after(1).await;
        });
    }
}
