//! Wake sources that already hold the task's waker.
//!
//! A connection task polls its timer and its shutdown signal on every wake
//! of a busy connection, twice per request, though neither has anything
//! new then: polling them only stores the same waker again (about 300
//! instructions each per request). [`Held`] remembers that a source took
//! this task's waker at its last `Pending` poll, so the caller can skip it
//! until it may be ready (a timer that fired, a signal that was sent).

use std::task::{Context, Poll, Waker};

/// The waker a wake source took at its last poll, if it surely took one.
#[derive(Debug, Default)]
pub(crate) struct Held(Option<Waker>);

impl Held {
    /// True when the source took this task's waker at its last poll and
    /// has not been reset since.
    pub(crate) fn by(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// Polls the source through `poll` and remembers whether it now holds
    /// the waker: it does after `Pending`, unless the task was out of
    /// budget (tokio's timers and channels then answer `Pending` without
    /// taking the waker).
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let takes = tokio::task::coop::has_budget_remaining();
        let answer = poll(cx);
        if answer.is_pending() && takes {
            if !self.by(cx) {
                self.0 = Some(cx.waker().clone());
            }
        } else {
            self.0 = None;
        }
        answer
    }

    /// The source was changed outside [`Held::poll`] (a timer reset): poll
    /// it next time.
    pub(crate) fn forget(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_only_after_a_pending_poll_that_took_the_waker() {
        let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(5)));
        let mut held = Held::default();
        std::future::poll_fn(|cx| {
            assert!(!held.by(cx), "nothing polled yet");
            assert!(held.poll(cx, |cx| sleep.as_mut().poll(cx)).is_pending());
            assert!(held.by(cx));
            // Another task's waker is not the one the timer holds.
            let other = Waker::from(Arc::new(Count(0.into())));
            assert!(!held.by(&Context::from_waker(&other)));
            held.forget();
            assert!(!held.by(cx));
            Poll::Ready(())
        })
        .await;
        // Fired: polled again, it answers Ready and holds nothing.
        tokio::time::advance(Duration::from_secs(6)).await;
        std::future::poll_fn(|cx| {
            assert!(held.poll(cx, |cx| sleep.as_mut().poll(cx)).is_ready());
            assert!(!held.by(cx));
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_budget_a_pending_poll_holds_nothing() {
        let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(5)));
        let mut held = Held::default();
        std::future::poll_fn(|cx| {
            // Use up this task's budget, as a busy connection can.
            while let Poll::Ready(progress) = tokio::task::coop::poll_proceed(cx) {
                progress.made_progress();
            }
            assert!(!tokio::task::coop::has_budget_remaining());
            assert!(held.poll(cx, |cx| sleep.as_mut().poll(cx)).is_pending());
            assert!(
                !held.by(cx),
                "the timer was not polled, so it holds no waker"
            );
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_skipped_timer_still_wakes_the_task_that_it_holds() {
        // The guard's pattern: poll once, then skip while not elapsed; the
        // task must still be woken when the timer fires.
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(5)));
        let mut held = Held::default();
        assert!(
            held.poll(&mut cx, |cx| sleep.as_mut().poll(cx))
                .is_pending()
        );
        for _ in 0..3 {
            assert!(held.by(&cx) && !sleep.is_elapsed());
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(sleep.is_elapsed());
    }
}
