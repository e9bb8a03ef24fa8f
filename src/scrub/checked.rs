//! Compressed answers passed on as the upstream compressed them.
//!
//! Decoding, scrubbing and re-encoding a compressed answer costs far more
//! than the rest of its request: re-encoding was three quarters of the
//! proxy's CPU on a 680 KB gzip feature answer (6.8 ms of CPU per answer
//! where nginx, passing it on, spent 0.16 ms), and the client got the
//! proxy's compression instead of the upstream's. Yet most answers hold
//! nothing to remove.
//!
//! [`CheckedBody`] reads such an answer and decodes it only to look for
//! what the [`Scrubber`] would change (the tokens, and upstream URL prefixes
//! when the route rewrites URLs). Nothing reaches the client while it reads.
//! When the answer ends clean within [`HOLD`] bytes, the upstream's own
//! bytes go on unchanged. In every other case — something to change, a
//! larger answer, one that takes longer than [`HOLD_TIME`] to arrive, or the
//! process's [`BUDGET`] of held bytes spent — it becomes a [`ScrubBody`]
//! over what was read and the rest, exactly the decode, scrub and re-encode
//! of before. An answer that does not decode fails the response, as in
//! [`ScrubBody`]: nothing goes on unread.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::{ScrubBody, ScrubPatterns, Scrubber};
use crate::body::{BoxError, PollFrame, Prefixed, ProxyBody};
use crate::codec::{Coding, Decoder};

/// Largest answer (in bytes as they come, compressed) held to be checked
/// whole; a larger one is scrubbed as it streams.
const HOLD: usize = 1 << 20;

/// Most bytes all answers being checked may hold at once in the process;
/// an answer that would go beyond is scrubbed as it streams instead.
const BUDGET: usize = 64 << 20;

/// Longest an answer is held: one still arriving after this is scrubbed as
/// it streams, so a slow answer reaches the client as it comes.
const HOLD_TIME: Duration = Duration::from_secs(1);

/// Bytes held by the answers being checked, against a limit.
struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    const fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The process's budget.
static HELD: Budget = Budget::new(BUDGET);

/// One answer's share of a [`Budget`], given back as its pieces leave and
/// in full when the body is dropped.
struct Share {
    budget: &'static Budget,
    bytes: usize,
}

impl Share {
    fn take(&mut self, n: usize) -> bool {
        let b = self.budget;
        let mut used = b.used.load(Ordering::Relaxed);
        loop {
            if used.saturating_add(n) > b.limit {
                return false;
            }
            match b
                .used
                .compare_exchange_weak(used, used + n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.bytes += n;
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.give_back(self.bytes);
    }
}

/// A compressed answer checked before any of it goes on (see the module
/// documentation).
pub struct CheckedBody {
    state: State,
    share: Share,
    hold: usize,
}

enum State {
    Reading(Box<Reading>),
    /// Checked clean: the upstream's pieces, then its trailers.
    Passing {
        pieces: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Scrubbing(Box<ScrubBody>),
    Done,
}

struct Reading {
    inner: ProxyBody,
    coding: Coding,
    decoder: Decoder,
    watch: Watch,
    scrubber: Scrubber,
    pieces: Vec<Bytes>,
    size: usize,
    /// When the first piece came.
    since: Option<Instant>,
}

/// How a read ended.
enum Outcome {
    /// Read to its end, nothing to change; its trailers.
    Clean(Option<HeaderMap>),
    /// To be scrubbed: what was read, then the rest.
    Scrub(Rest),
}

/// What follows the pieces read when an answer goes to be scrubbed.
enum Rest {
    /// The answer's body, still streaming.
    Coming,
    /// Nothing but these trailers: the answer was read to its end.
    Ended(Option<HeaderMap>),
}

impl CheckedBody {
    /// Checks `inner`, whose content coding is `coding` (not identity),
    /// against what `scrubber` would change.
    pub fn new(inner: ProxyBody, coding: Coding, scrubber: Scrubber) -> CheckedBody {
        CheckedBody::with_limits(inner, coding, scrubber, HOLD, &HELD)
    }

    /// As [`CheckedBody::new`], with its own hold and budget.
    fn with_limits(
        inner: ProxyBody,
        coding: Coding,
        scrubber: Scrubber,
        hold: usize,
        budget: &'static Budget,
    ) -> CheckedBody {
        let watch = Watch::new(Arc::clone(&scrubber.pats));
        CheckedBody {
            state: State::Reading(Box::new(Reading {
                inner,
                coding,
                decoder: Decoder::new(coding),
                watch,
                scrubber,
                pieces: Vec::new(),
                size: 0,
                since: None,
            })),
            share: Share { budget, bytes: 0 },
            hold,
        }
    }

    /// Reads until the answer ends or must be scrubbed.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome, BoxError>> {
        let State::Reading(r) = &mut self.state else {
            unreachable!("read only while reading")
        };
        loop {
            let frame = match Pin::new(&mut r.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(r.finish(None)),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(r.finish(frame.into_trailers().ok())),
            };
            let plain = r.decoder.push(&data).map_err(BoxError::from)?;
            let since = *r.since.get_or_insert_with(Instant::now);
            let clean = !r.watch.sees(&plain);
            let n = data.len();
            r.size += n;
            let kept =
                clean && r.size <= self.hold && since.elapsed() < HOLD_TIME && self.share.take(n);
            r.pieces.push(data);
            if !kept {
                return Poll::Ready(Ok(Outcome::Scrub(Rest::Coming)));
            }
        }
    }

    fn poll_passing(&mut self) -> PollFrame {
        let State::Passing { pieces, trailers } = &mut self.state else {
            unreachable!("only while passing")
        };
        if let Some(piece) = pieces.pop_front() {
            self.share.give_back(piece.len());
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let last = trailers.take().map(|t| Ok(Frame::trailers(t)));
        self.state = State::Done;
        Poll::Ready(last)
    }
}

impl Reading {
    /// The end of the answer, with its trailers.
    fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<Outcome, BoxError> {
        if self.size == 0 {
            // No body at all (a 204, or a HEAD answer's headers): nothing to
            // show, and nothing for a decoder to call truncated.
            return Ok(Outcome::Clean(trailers));
        }
        let decoder = std::mem::replace(&mut self.decoder, Decoder::Identity);
        let plain = decoder.finish().map_err(BoxError::from)?;
        if self.watch.sees(&plain) {
            return Ok(Outcome::Scrub(Rest::Ended(trailers)));
        }
        Ok(Outcome::Clean(trailers))
    }

    /// The same answer, scrubbed as it streams: what was read, then `rest`.
    fn into_scrub(self, rest: Rest) -> ScrubBody {
        let rest = match rest {
            Rest::Coming => self.inner,
            Rest::Ended(trailers) => ended(trailers),
        };
        let body = Prefixed::new(self.pieces, rest).boxed();
        ScrubBody::new(body, self.coding, self.scrubber)
    }
}

/// A body with nothing more to give but `trailers`.
fn ended(trailers: Option<HeaderMap>) -> ProxyBody {
    let frames = trailers.map(|t| Ok::<_, BoxError>(Frame::trailers(t)));
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

impl Body for CheckedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Passing { .. } => return this.poll_passing(),
                State::Scrubbing(s) => return Pin::new(&mut **s).poll_frame(cx),
                State::Reading(_) => {}
            }
            let outcome = match this.read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.state = State::Done;
                    this.share.give_back(this.share.bytes);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Ok(outcome)) => outcome,
            };
            let State::Reading(r) = std::mem::replace(&mut this.state, State::Done) else {
                unreachable!("read only while reading")
            };
            this.state = match outcome {
                Outcome::Clean(trailers) => State::Passing {
                    pieces: r.pieces.into(),
                    trailers,
                },
                Outcome::Scrub(rest) => {
                    // The pieces now belong to the scrubbing stream.
                    this.share.give_back(this.share.bytes);
                    State::Scrubbing(Box::new(r.into_scrub(rest)))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Scrubbing(s) => s.is_end_stream(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Looks for the scrubber's patterns in a stream of decoded pieces, keeping
/// the last bytes of each so a match across two pieces is seen.
struct Watch {
    pats: Arc<ScrubPatterns>,
    tail: Vec<u8>,
}

impl Watch {
    fn new(pats: Arc<ScrubPatterns>) -> Watch {
        Watch {
            pats,
            tail: Vec::new(),
        }
    }

    /// Whether a pattern ends in `piece`.
    fn sees(&mut self, piece: &[u8]) -> bool {
        // `keep` is longer than any pattern: a match that starts in the
        // tail ends within the first `keep` bytes of the piece.
        let keep = self.pats.keep;
        if self.pats.ac.is_match(piece) {
            return true;
        }
        self.tail.extend_from_slice(&piece[..piece.len().min(keep)]);
        if self.pats.ac.is_match(&self.tail[..]) {
            return true;
        }
        if piece.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&piece[piece.len() - keep..]);
        } else {
            let over = self.tail.len().saturating_sub(keep);
            self.tail.drain(..over);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_all;
    use crate::codec::tests::encode_all;

    const T: &str = "TOK3n.Abc-_xyz9";
    const CODINGS: [Coding; 3] = [Coding::Gzip, Coding::Deflate, Coding::Brotli];

    /// A budget of its own for each test (tests run in parallel).
    fn budget(limit: usize) -> &'static Budget {
        Box::leak(Box::new(Budget::new(limit)))
    }

    fn frames(pieces: Vec<Vec<u8>>, trailers: Option<HeaderMap>) -> ProxyBody {
        let data = pieces
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
        let end = trailers.map(|t| Ok(Frame::trailers(t)));
        http_body_util::StreamBody::new(futures_util::stream::iter(data.chain(end))).boxed()
    }

    fn checked(
        encoded: &[u8],
        piece: usize,
        coding: Coding,
        hold: usize,
        b: &'static Budget,
    ) -> CheckedBody {
        let pieces = encoded.chunks(piece).map(|c| c.to_vec()).collect();
        let scrubber = Scrubber::new(&[T], &[]).unwrap();
        CheckedBody::with_limits(frames(pieces, None), coding, scrubber, hold, b)
    }

    async fn collect(body: CheckedBody) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    /// A feature answer of about `n` bytes, with `insert` in the middle.
    fn answer(n: usize, insert: &str) -> String {
        // Varied numbers, so it compresses about as well as real answers.
        let mut x: u64 = 7;
        let mut half = String::new();
        while half.len() < n / 2 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (a, b) = ((x >> 20) % 1_000_000, (x >> 40) % 1_000_000);
            half.push_str(&format!(
                r#"{{"attributes":{{"OBJECTID":{a},"NAME":"Park {b}"}},"geometry":{{"x":-122.{a},"y":37.{b}}}}},"#
            ));
        }
        format!(r#"{{"features":[{half}{{"url":"{insert}"}},{half}{{}}]}}"#)
    }

    #[tokio::test]
    async fn a_clean_answer_goes_on_as_the_upstream_encoded_it() {
        let b = budget(BUDGET);
        for coding in CODINGS {
            let encoded = encode_all(coding, answer(200_000, "https://h/x?f=json").as_bytes());
            for piece in [13, 4096, encoded.len()] {
                let out = collect(checked(&encoded, piece, coding, HOLD, b))
                    .await
                    .unwrap();
                assert!(
                    out == encoded,
                    "{coding:?} in pieces of {piece}: bytes changed"
                );
            }
        }
        assert_eq!(b.used(), 0, "held bytes not given back");
    }

    #[tokio::test]
    async fn a_token_anywhere_is_scrubbed() {
        let b = budget(BUDGET);
        let text = answer(100_000, &format!("https://h/x?token={T}&f=json"));
        let expected = answer(100_000, "https://h/x?f=json");
        for coding in CODINGS {
            let encoded = encode_all(coding, text.as_bytes());
            // Piece sizes that cut the token at many places of the plain text.
            for piece in [7, 13, 64, 1000, 4096, encoded.len()] {
                let out = collect(checked(&encoded, piece, coding, HOLD, b))
                    .await
                    .unwrap();
                let plain = decode_all(coding, &out, 1 << 24).unwrap();
                assert!(
                    plain == expected.as_bytes(),
                    "{coding:?} in pieces of {piece}"
                );
            }
        }
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_token_split_between_two_pieces_is_seen() {
        // Identity-like check of the watch alone: the token cut at every place.
        let pats = Scrubber::new(&[T], &[]).unwrap().pats;
        let text = format!("{}{T}{}", "a".repeat(300), "b".repeat(300));
        for cut in 0..text.len() {
            let mut w = Watch::new(Arc::clone(&pats));
            let seen = w.sees(&text.as_bytes()[..cut]) | w.sees(&text.as_bytes()[cut..]);
            assert!(seen, "cut at {cut}");
        }
        // And in three pieces, the middle one shorter than the token.
        for start in 290..310 {
            let mut w = Watch::new(Arc::clone(&pats));
            let t = text.as_bytes();
            let seen = w.sees(&t[..start]) | w.sees(&t[start..start + 5]) | w.sees(&t[start + 5..]);
            assert!(seen, "pieces at {start}");
        }
        let mut w = Watch::new(pats);
        assert!(!w.sees(text.replace(T, "").as_bytes()));
    }

    #[tokio::test]
    async fn an_answer_beyond_the_hold_is_scrubbed_as_it_streams() {
        let b = budget(BUDGET);
        let hold = 8 * 1024;
        for (insert, expected) in [
            ("https://h/x?f=json".to_string(), "https://h/x?f=json"),
            (
                format!("https://h/x?token={T}&f=json"),
                "https://h/x?f=json",
            ),
        ] {
            let text = answer(400_000, &insert);
            for coding in CODINGS {
                let encoded = encode_all(coding, text.as_bytes());
                assert!(encoded.len() > hold);
                let out = collect(checked(&encoded, 1000, coding, hold, b))
                    .await
                    .unwrap();
                assert!(out != encoded, "{coding:?}: held whole beyond the hold");
                let plain = decode_all(coding, &out, 1 << 24).unwrap();
                assert!(plain == answer(400_000, expected).as_bytes(), "{coding:?}");
            }
        }
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_spent_budget_scrubs_as_it_streams() {
        let text = answer(50_000, &format!("u?token={T}"));
        let clean = answer(50_000, "u");
        for coding in CODINGS {
            let encoded = encode_all(coding, text.as_bytes());
            let small = budget(encoded.len() / 2);
            let out = collect(checked(&encoded, 100, coding, HOLD, small))
                .await
                .unwrap();
            assert!(decode_all(coding, &out, 1 << 24).unwrap() == clean.as_bytes());
            let encoded = encode_all(coding, clean.as_bytes());
            let out = collect(checked(&encoded, 100, coding, HOLD, small))
                .await
                .unwrap();
            assert!(out != encoded, "{coding:?}: passed on without being held");
            assert!(decode_all(coding, &out, 1 << 24).unwrap() == clean.as_bytes());
            assert_eq!(small.used(), 0);
        }
    }

    #[tokio::test]
    async fn the_budget_is_held_while_checking_and_given_back() {
        let b = budget(BUDGET);
        let encoded = encode_all(Coding::Gzip, answer(100_000, "x").as_bytes());
        let mut body = checked(&encoded, 1000, Coding::Gzip, HOLD, b);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        // The whole answer was read before the first piece went on.
        assert_eq!(b.used(), encoded.len() - first.len());
        drop(body);
        assert_eq!(b.used(), 0, "a dropped body keeps its share");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_is_scrubbed_as_it_streams() {
        let b = budget(BUDGET);
        let text = answer(100_000, "https://h/x");
        let encoded = encode_all(Coding::Gzip, text.as_bytes());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let inner = http_body_util::StreamBody::new(tokio_stream_rx(rx)).boxed();
        let scrubber = Scrubber::new(&[T], &[]).unwrap();
        let mut body = CheckedBody::with_limits(inner, Coding::Gzip, scrubber, HOLD, b);
        let (a, rest) = encoded.split_at(encoded.len() / 2);
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(a))))
            .await
            .unwrap();
        // Nothing goes on while the answer is checked.
        let waiting = tokio::time::timeout(Duration::from_millis(900), body.frame()).await;
        assert!(
            waiting.is_err(),
            "a piece went on before the answer was checked"
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(rest))))
            .await
            .unwrap();
        // Past the hold time: what came is scrubbed and goes on without the end.
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("held past the hold time")
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert!(!first.is_empty());
        assert_eq!(b.used(), 0);
        drop(tx);
        let mut out = first.to_vec();
        while let Some(f) = body.frame().await {
            out.extend_from_slice(&f.unwrap().into_data().unwrap());
        }
        assert!(decode_all(Coding::Gzip, &out, 1 << 24).unwrap() == text.as_bytes());
    }

    fn tokio_stream_rx<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + Sync {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
    }

    #[tokio::test]
    async fn an_answer_that_does_not_decode_fails_and_shows_nothing() {
        let b = budget(BUDGET);
        for coding in CODINGS {
            let encoded = encode_all(coding, answer(50_000, &format!("u?token={T}")).as_bytes());
            let truncated = &encoded[..encoded.len() - 3];
            let trailing = [&encoded[..], b"more"].concat();
            let mut corrupt = encoded.clone();
            let n = corrupt.len();
            corrupt[n / 2] ^= 0x55;
            for (what, bytes) in [
                ("truncated", truncated),
                ("trailing", &trailing[..]),
                ("corrupt", &corrupt[..]),
            ] {
                let mut body = checked(bytes, 500, coding, HOLD, b);
                let mut out = Vec::new();
                let mut failed = false;
                while let Some(f) = body.frame().await {
                    match f {
                        Ok(f) => out.extend_from_slice(&f.into_data().unwrap_or_default()),
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                let shown = String::from_utf8_lossy(&decode_partial(coding, &out)).into_owned();
                assert!(!shown.contains(T), "{coding:?} {what}: token shown");
                assert!(
                    failed || out.is_empty() || decode_all(coding, &out, 1 << 24).is_ok(),
                    "{coding:?} {what}"
                );
            }
        }
        assert_eq!(b.used(), 0);
    }

    /// What a lenient client would make of `out`.
    fn decode_partial(coding: Coding, out: &[u8]) -> Vec<u8> {
        let mut d = Decoder::new(coding);
        d.push(out).unwrap_or_default()
    }

    #[tokio::test]
    async fn an_empty_answer_stays_empty() {
        for coding in CODINGS {
            let out = collect(checked(&[], 1, coding, HOLD, budget(BUDGET))).await;
            assert_eq!(out.unwrap(), Vec::<u8>::new(), "{coding:?}");
        }
    }

    #[tokio::test]
    async fn trailers_follow_the_answer_either_way() {
        let b = budget(BUDGET);
        for insert in ["u".to_string(), format!("u?token={T}")] {
            let encoded = encode_all(Coding::Gzip, answer(20_000, &insert).as_bytes());
            let mut t = HeaderMap::new();
            t.insert("x-checksum", "1".parse().unwrap());
            let pieces = encoded.chunks(999).map(|c| c.to_vec()).collect();
            let scrubber = Scrubber::new(&[T], &[]).unwrap();
            let body =
                CheckedBody::with_limits(frames(pieces, Some(t)), Coding::Gzip, scrubber, HOLD, b);
            let all = body.collect().await.unwrap();
            assert_eq!(
                all.trailers().and_then(|t| t.get("x-checksum")).unwrap(),
                "1",
                "{insert}"
            );
            let plain = decode_all(Coding::Gzip, &all.to_bytes(), 1 << 24).unwrap();
            assert!(plain == answer(20_000, "u").as_bytes());
        }
    }
}
