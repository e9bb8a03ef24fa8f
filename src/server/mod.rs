//! Listeners: accept loop, TLS handshake, connection limit, HTTP/1.1 + HTTP/2
//! serving, and graceful shutdown.
//!
//! [`run`] takes already-bound listeners (tests bind port 0) and a shutdown
//! future. One acceptor hands each connection to the serving thread with
//! the fewest open ones. A connection permit is taken *before* `accept`, so
//! beyond `max_connections` new connections wait unaccepted in the kernel
//! backlog. The TLS handshake and the request head share the
//! `header_read_timeout` budget (slow-loris guard); an HTTP/1 connection
//! with no request in progress and no complete head for that long is closed
//! (the framing guard's idle timer, see `http1::guard::Activity`), and one
//! idle for a second is parked: hyper's connection and buffers, and the TLS
//! stream's own (`tls`, rustls' unbuffered API), are dropped until the next
//! bytes arrive (`conn`). On shutdown the loops stop
//! accepting, every connection is asked to finish (HTTP/2 GOAWAY, HTTP/1
//! close after the current response, a parked one closed at once; `drain`),
//! and stragglers are cut after `shutdown_grace`.
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::admin;
use crate::app::{App, stopped};
use crate::proxy::ConnInfo;

mod conn;
mod drain;
mod listeners;
mod tls;

pub use conn::BoxingExecutor;
pub use listeners::Listeners;

/// What the serving modes share: the connection limit, the signal that
/// stops the accept loops, and the one that stops the admin listener once
/// draining is over (so `/readyz` keeps answering 503 while it lasts).
struct Prepared {
    permits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
    admin_stop: watch::Sender<bool>,
}

/// Checks the listeners against the config and starts what every mode
/// needs: token refreshers and the admin listener.
fn prepare(app: &Arc<App>, listeners: &mut Listeners) -> io::Result<Prepared> {
    let first = app.current();
    if listeners.tls.is_some() && first.tls.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "HTTPS listener without TLS settings",
        ));
    }
    first.proxy.start_refreshers();
    let (admin_stop, admin_rx) = watch::channel(false);
    if let Some(admin) = listeners.admin.take() {
        tokio::spawn(admin::serve(admin, Arc::clone(app), admin_rx));
    }
    Ok(Prepared {
        permits: Arc::new(Semaphore::new(first.proxy.config().limits.max_connections)),
        stop: watch::channel(false).0,
        admin_stop,
    })
}

/// Serves `app` on `listeners` until `shutdown` completes, then drains.
///
/// With one upstream pool (one shard) the connections are served on the
/// calling runtime; with more, each shard gets a thread with its own
/// single-threaded runtime and pool, so a request never hops between
/// cores. Either way the calling runtime accepts connections and hands each
/// to the shard with the fewest open ones; it also runs the admin listener,
/// token refreshes and `shutdown`.
pub async fn run(
    app: Arc<App>,
    mut listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let p = prepare(&app, &mut listeners)?;
    let shards = app.proxy().clients().shards();
    let mut queues = Vec::with_capacity(shards);
    let mut serving = Vec::with_capacity(shards);
    for shard in 0..shards {
        let (queue, incoming) = Queue::new();
        queues.push(queue);
        let app = Arc::clone(&app);
        if shards == 1 {
            serving.push(Serving::Task(spawn_shard(app, incoming, shard)));
            continue;
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("serve-{shard}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build a serving runtime");
                // Joined, not polled by `block_on` itself: see `spawn_shard`.
                let _ = rt.block_on(async { spawn_shard(app, incoming, shard).await });
                let _ = done_tx.send(());
            })?;
        serving.push(Serving::Thread(done_rx));
    }
    app.status.listening.store(true, Ordering::SeqCst);
    let acceptor = tokio::spawn(accept_loop(
        Arc::clone(&app),
        listeners.tls,
        listeners.plain,
        p.permits,
        queues,
        p.stop.subscribe(),
    ));
    shutdown.await;
    begin_shutdown(&app);
    let _ = p.stop.send(true);
    let _ = acceptor.await;
    for s in serving {
        match s {
            Serving::Task(t) => drop(t.await),
            Serving::Thread(done) => drop(done.await),
        }
    }
    let _ = p.admin_stop.send(true);
    tracing::info!("stopped");
    Ok(())
}

/// A shard being served, to wait for on shutdown.
enum Serving {
    /// On the calling runtime.
    Task(tokio::task::JoinHandle<()>),
    /// On a thread of its own, which says when it is done.
    Thread(tokio::sync::oneshot::Receiver<()>),
}

fn begin_shutdown(app: &App) {
    app.status.shutting_down.store(true, Ordering::SeqCst);
    tracing::info!(
        open_connections = app.status.open_connections.load(Ordering::Relaxed),
        grace_secs = app.proxy().config().server.shutdown_grace.as_secs(),
        "shutting down: no longer accepting, draining connections"
    );
}

/// An accepted connection on its way to a serving thread. It leaves the
/// acceptor's runtime as a std socket and joins the serving thread's.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: bool,
    permit: OwnedSemaphorePermit,
}

/// A connection counted as open, on its serving thread and in the status,
/// for as long as this lives: from the hand-off until the connection's task
/// ends, however it ends (a panic included).
struct Open {
    on_thread: Arc<AtomicUsize>,
    app: Arc<App>,
}

impl Open {
    fn new(on_thread: &Arc<AtomicUsize>, app: &Arc<App>) -> Open {
        on_thread.fetch_add(1, Ordering::Relaxed);
        app.status.open_connections.fetch_add(1, Ordering::Relaxed);
        Open {
            on_thread: Arc::clone(on_thread),
            app: Arc::clone(app),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.on_thread.fetch_sub(1, Ordering::Relaxed);
        self.app
            .status
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The acceptor's end of one serving thread's queue, with the count of
/// connections open on that thread.
struct Queue {
    tx: mpsc::UnboundedSender<(Accepted, Open)>,
    open: Arc<AtomicUsize>,
}

/// The serving thread's end.
struct Incoming {
    rx: mpsc::UnboundedReceiver<(Accepted, Open)>,
}

impl Queue {
    fn new() -> (Queue, Incoming) {
        let (tx, rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        (Queue { tx, open }, Incoming { rx })
    }
}

/// The queue a new connection goes to: the one with the fewest open
/// connections, ties taken in turn from `*next`.
///
/// Balancing is why one acceptor hands connections out instead of every
/// serving thread accepting from the shared socket: then the first thread
/// woken takes the whole burst (tokio accepts until the backlog is empty),
/// and a benchmark's 64 keep-alive connections all landed on one thread
/// while the other stayed idle.
fn pick(queues: &[Queue], next: &mut usize) -> usize {
    let n = queues.len();
    let start = *next % n;
    *next = next.wrapping_add(1);
    (0..n)
        .map(|i| (start + i) % n)
        .min_by_key(|&i| queues[i].open.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// Accepts until `stop`, taking a connection permit first, and hands each
/// connection to a serving thread. Dropping the queues on the way out lets
/// the serving threads drain.
async fn accept_loop(
    app: Arc<App>,
    tls_listener: Option<TcpListener>,
    plain_listener: Option<TcpListener>,
    permits: Arc<Semaphore>,
    mut queues: Vec<Queue>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
            () = stopped(&mut stop) => break,
        };
        let (stream, peer, tls) = tokio::select! {
            r = accept(tls_listener.as_ref()) => match r {
                Ok((s, p)) => (s, p, true),
                Err(e) => { accept_error(e).await; continue; }
            },
            r = accept(plain_listener.as_ref()) => match r {
                Ok((s, p)) => (s, p, false),
                Err(e) => { accept_error(e).await; continue; }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand an accepted connection over");
                continue;
            }
        };
        let mut accepted = Accepted {
            stream,
            peer,
            tls,
            permit,
        };
        loop {
            if queues.is_empty() {
                // /readyz turns 503, so an orchestrator replaces us.
                app.status.listening.store(false, Ordering::SeqCst);
                tracing::error!("no serving thread left; no longer accepting");
                return;
            }
            let i = pick(&queues, &mut next);
            let open = Open::new(&queues[i].open, &app);
            match queues[i].tx.send((accepted, open)) {
                Ok(()) => break,
                // Its `Open` is dropped here, uncounting it.
                Err(mpsc::error::SendError((back, _))) => {
                    // A serving thread only stops after its queue closes,
                    // so this one panicked: it would otherwise look least
                    // loaded forever and swallow every new connection.
                    tracing::error!("a serving thread stopped; its share goes to the others");
                    queues.swap_remove(i);
                    accepted = back;
                }
            }
        }
    }
}

/// Starts serving a shard on the current runtime.
///
/// Both ways a shard runs (inline on the calling runtime, or on a thread of
/// its own) start here, and this function is not generic, so the serving
/// code (`serve_shard` down to h2 and TLS) is compiled once. Spawned from
/// two places of the generic [`run`], it was compiled twice, once per path
/// (1.2 MB of the binary); the profile-guided build, trained on the
/// one-thread demo, left the copy a multi-core server runs untrained, and
/// that copy was hardly faster than the plain build (BENCHMARKS.md, run
/// CH).
fn spawn_shard(app: Arc<App>, incoming: Incoming, shard: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve_shard(app, incoming, shard))
}

/// One serving thread: TLS and HTTP for the connections handed to it,
/// until the acceptor closes its queue; then drains its connections for up
/// to the grace period.
async fn serve_shard(app: Arc<App>, mut incoming: Incoming, shard: usize) {
    let drain = drain::Drain::new();
    let mut last_settings = None;
    while let Some((a, open)) = incoming.rx.recv().await {
        let stream = match TcpStream::from_std(a.stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer = %a.peer, error = %e, "cannot take over an accepted connection");
                continue;
            }
        };
        let info = ConnInfo {
            peer: a.peer,
            tls: a.tls,
            shard,
        };
        let shutdown = drain.shutdown();
        let settings = conn::Settings::current(&app, &mut last_settings);
        let (app, permit) = (Arc::clone(&app), a.permit);
        tokio::spawn(async move {
            // Both released when the task ends, even by a panic.
            let _held = (open, permit);
            if let Err(e) = conn::serve_connection(&app, &settings, stream, info, shutdown).await {
                tracing::debug!(peer = %info.peer, error = %crate::error::describe(&*e), "connection ended with an error");
            }
        });
    }
    let grace = app.proxy().config().server.shutdown_grace;
    match tokio::time::timeout(grace, drain.drain()).await {
        Ok(()) => tracing::info!(shard, "all connections closed"),
        Err(_) => tracing::warn!(shard, "grace period over; closing remaining connections"),
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_error(e: io::Error) {
    // Out of file descriptors and similar: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Arc<App> {
        let config =
            crate::config::tests::load(crate::config::tests::MINIMAL).expect("test config loads");
        App::with_shards(Arc::new(config), 2)
    }

    /// Queues with `open` connections counted on each; also returns the
    /// serving threads' ends and their counters.
    fn queues(open: &[usize]) -> (Vec<Queue>, Vec<(Incoming, Arc<AtomicUsize>)>) {
        open.iter()
            .map(|&n| {
                let (q, i) = Queue::new();
                q.open.store(n, Ordering::Relaxed);
                let counter = Arc::clone(&q.open);
                (q, (i, counter))
            })
            .unzip()
    }

    #[test]
    fn pick_takes_the_least_loaded_thread_and_turns_on_ties() {
        let (qs, _keep) = queues(&[3, 1, 1]);
        let mut next = 0;
        let picks: Vec<usize> = (0..4).map(|_| pick(&qs, &mut next)).collect();
        // Never the loaded thread; the two tied ones in turn.
        assert!(!picks.contains(&0), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
        let (qs, _keep) = queues(&[0, 0]);
        let picks: Vec<usize> = (0..4).map(|_| pick(&qs, &mut next)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2, "{picks:?}");
    }

    /// Ten connections opened at once reach two serving threads five and
    /// five (when each thread accepted for itself, the first one woken took
    /// the whole burst), and stopping closes the queues.
    #[tokio::test]
    async fn a_burst_of_connections_is_spread_over_the_serving_threads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (qs, mut incoming) = queues(&[0, 0]);
        let (stop_tx, stop_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(100));
        let app = app();
        let acceptor = tokio::spawn(accept_loop(
            Arc::clone(&app),
            None,
            Some(listener),
            Arc::clone(&permits),
            qs,
            stop_rx,
        ));
        let clients: Vec<TcpStream> =
            futures_util::future::join_all((0..10).map(|_| TcpStream::connect(addr)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let mut held = Vec::new();
        for (inc, open) in &mut incoming {
            for _ in 0..5 {
                let (a, mark) = tokio::time::timeout(Duration::from_secs(5), inc.rx.recv())
                    .await
                    .expect("a connection arrives")
                    .expect("queue open");
                assert!(!a.tls);
                held.push((a, mark));
            }
            assert_eq!(open.load(Ordering::Relaxed), 5);
        }
        assert_eq!(app.status.open_connections.load(Ordering::Relaxed), 10);
        // Each handed-out connection holds its permit; the acceptor holds
        // one for the next connection.
        assert_eq!(permits.available_permits(), 89);
        drop(held);
        assert_eq!(permits.available_permits(), 99);
        // Gone connections are counted out on their thread and overall.
        for (_, open) in &incoming {
            assert_eq!(open.load(Ordering::Relaxed), 0);
        }
        assert_eq!(app.status.open_connections.load(Ordering::Relaxed), 0);
        let _ = stop_tx.send(true);
        acceptor.await.unwrap();
        for (inc, _) in &mut incoming {
            assert!(inc.rx.recv().await.is_none(), "nothing extra, queue closed");
        }
        drop(clients);
    }

    /// A serving thread that is gone (its end of the queue dropped) would
    /// look least loaded forever; its connections go to the others instead.
    #[tokio::test]
    async fn a_stopped_serving_thread_gets_no_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (qs, mut incoming) = queues(&[0, 0]);
        let (mut live, live_open) = incoming.pop().unwrap();
        drop(incoming);
        let (stop_tx, stop_rx) = watch::channel(false);
        let acceptor = tokio::spawn(accept_loop(
            app(),
            None,
            Some(listener),
            Arc::new(Semaphore::new(100)),
            qs,
            stop_rx,
        ));
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let a = tokio::time::timeout(Duration::from_secs(5), live.rx.recv())
                .await
                .expect("the connection reaches the live thread")
                .expect("queue open");
            held.push(a);
        }
        assert_eq!(live_open.load(Ordering::Relaxed), 4);
        let _ = stop_tx.send(true);
        acceptor.await.unwrap();
    }

    /// With every serving thread gone the acceptor stops and the proxy
    /// stops reporting itself as listening (so /readyz answers 503).
    #[tokio::test]
    async fn no_serving_thread_left_stops_accepting_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (qs, incoming) = queues(&[0, 0]);
        drop(incoming);
        let app = app();
        app.status.listening.store(true, Ordering::SeqCst);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let acceptor = tokio::spawn(accept_loop(
            Arc::clone(&app),
            None,
            Some(listener),
            Arc::new(Semaphore::new(100)),
            qs,
            stop_rx,
        ));
        let _client = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), acceptor)
            .await
            .expect("the acceptor stops")
            .unwrap();
        assert!(!app.status.listening.load(Ordering::SeqCst));
        assert_eq!(app.status.open_connections.load(Ordering::Relaxed), 0);
    }
}
