//! The HTTP/1.1 accept loop: a cap on open connections and the timeouts that keep idle,
//! trickling or non-reading clients from holding a connection (and a file descriptor) forever.
//!
//! Each connection's socket is wrapped in [`TimedIo`], which sees every read and write:
//! - **header timeout**: from the first byte of a request head to its end (slowloris), and
//!   from accept to a first request on a fresh connection;
//! - **keep-alive timeout**: an idle connection between requests (no byte of a next request);
//! - **write timeout**: a write that makes no progress for this long (a client that stopped
//!   reading, e.g. a stalled SSE stream) ends the connection, which drops the response stream
//!   and so aborts its request in the engine.
//!
//! A connection is *busy* from the moment its request head is parsed until its response body
//! has been handed over entirely (a guard inside the body); the read timeouts apply only while
//! it is not busy, so a long generation is never cut. The body-read timeout is the router's
//! (it reads the whole body under one deadline, `serve::read_body`).
//!
//! Past `max_connections`, a new connection gets `503` with an OpenAI-style JSON body and is
//! closed at once (a non-blocking write, no task): the process never runs out of descriptors
//! because of clients it cannot serve.

use super::error::ApiError;
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tower_service::Service;

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub write_timeout: Duration,
}

/// Milliseconds since a process-wide origin (so times fit an atomic).
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What one connection's reads and its requests tell each other.
#[derive(Default)]
struct ConnState {
    /// requests whose response body has not been handed over yet
    busy: AtomicUsize,
    /// when the connection last became idle (accept, or a response finished)
    idle_since: AtomicU64,
    /// when the first byte of the next request head arrived (0: none yet)
    head_started: AtomicU64,
    /// requests served so far
    served: AtomicU64,
    /// requests hyper handed to the router (each gets one response head)
    dispatched: AtomicU64,
    /// the pending read, woken when the connection turns idle (its deadline starts then)
    reader: std::sync::Mutex<Option<std::task::Waker>>,
}

impl ConnState {
    fn new() -> Self {
        let s = ConnState::default();
        s.idle_since.store(now_ms(), Relaxed);
        s
    }

    /// The instant (ms) past which a pending read ends the connection; `None` while busy.
    fn read_deadline(&self, lim: &ConnLimits) -> Option<u64> {
        if self.busy.load(Relaxed) > 0 {
            return None;
        }
        let head = self.head_started.load(Relaxed);
        let ms = |d: Duration| d.as_millis() as u64;
        Some(if head != 0 {
            head + ms(lim.header_timeout)
        } else if self.served.load(Relaxed) == 0 {
            self.idle_since.load(Relaxed) + ms(lim.header_timeout)
        } else {
            self.idle_since.load(Relaxed) + ms(lim.keep_alive_timeout)
        })
    }
}

/// Marks the connection busy while alive: taken when a request head is parsed, dropped with
/// the response body (or with the request's future, if the connection goes first).
struct Busy(Arc<ConnState>);

impl Busy {
    fn begin(st: &Arc<ConnState>) -> Busy {
        st.busy.fetch_add(1, Relaxed);
        st.dispatched.fetch_add(1, Relaxed);
        st.head_started.store(0, Relaxed);
        Busy(st.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Relaxed);
        self.0.served.fetch_add(1, Relaxed);
        if self.0.busy.fetch_sub(1, Relaxed) == 1 {
            // a read pending while busy has no timer: let it arm the keep-alive one
            if let Some(w) = self.0.reader.lock().unwrap().take() {
                w.wake();
            }
        }
    }
}

/// A response body that holds the connection's [`Busy`] guard until it is done.
struct GuardedBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// A socket whose reads end after the header or keep-alive timeout while the connection is
/// not busy, and whose writes end when they make no progress for the write timeout.
struct TimedIo {
    inner: TcpStream,
    st: Arc<ConnState>,
    lim: ConnLimits,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    /// response heads written so far
    heads: u64,
    /// hyper's own error response (a request it could not parse), rewritten with a JSON body:
    /// the bytes and how many have gone out
    rewritten: Option<(Vec<u8>, usize)>,
    /// closing: until when (ms) the client's late bytes are read and dropped, and how many
    linger: Option<(u64, usize)>,
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// How much of it, at most.
const LINGER_BYTES: usize = 16 << 20;

/// hyper answers a request it cannot parse (431 headers too large, 414 URI too long, 400 bad
/// framing such as an invalid Content-Length) itself, with an empty body, before the router
/// sees anything. The same answer with an OpenAI-style JSON body, or `None` when `head` is not
/// such a response.
fn rewrite_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let code: u16 = std::str::from_utf8(head.strip_prefix(b"HTTP/1.1 ")?.get(..3)?)
        .ok()?
        .parse()
        .ok()?;
    let status = axum::http::StatusCode::from_u16(code).ok()?;
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let msg = match code {
        431 => "the request's headers are too large".to_string(),
        414 => "the request's URI is too long".to_string(),
        400 => "malformed HTTP request (request line, headers or Content-Length)".to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut e = ApiError::bad_request(msg);
    e.status = status;
    let body = e.body().to_string();
    Some(
        format!(
            "HTTP/1.1 {code} {}\r\ncontent-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{body}",
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

/// Arm `timer` for `at_ms` (re-arming it when the deadline moved); true when it has fired.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, at_ms: u64, cx: &mut Context<'_>) -> bool {
    let now = now_ms();
    if at_ms <= now {
        return true;
    }
    let at = tokio::time::Instant::now() + Duration::from_millis(at_ms - now);
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    // re-arm only when the deadline moved by more than a few ms (the clocks differ slightly)
    let moved = t.deadline().max(at) - t.deadline().min(at) > Duration::from_millis(5);
    if moved {
        t.as_mut().reset(at);
    }
    t.as_mut().poll(cx).is_ready()
}

impl TimedIo {
    /// Sees the start of every write: counts response heads, and swaps hyper's own error
    /// answer (a head with no request dispatched for it) for [`rewrite_parse_error`]'s.
    /// `Some(n)`: the write of `n` bytes is taken (swallowed, the rewrite goes out instead).
    fn intercept(&mut self, first: &[u8], total: usize) -> Option<usize> {
        if self.rewritten.is_some() {
            return Some(total); // hyper closes after its error; nothing else goes out
        }
        // an interim `100 Continue` is not the request's response
        if !first.starts_with(b"HTTP/1.1 ") || first.starts_with(b"HTTP/1.1 1") {
            return None;
        }
        if self.heads < self.st.dispatched.load(Relaxed) {
            self.heads += 1;
            return None;
        }
        let r = rewrite_parse_error(first)?;
        self.rewritten = Some((r, 0));
        Some(total)
    }

    /// Writes out what is left of the rewritten error response.
    fn poll_rewritten(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, off)) = self.rewritten.as_mut() {
            if *off == bytes.len() {
                break;
            }
            let (b, o) = (std::mem::take(bytes), *off);
            let r = self.poll_write_with(cx, |s, cx| s.poll_write(cx, &b[o..]));
            let (bytes, off) = self.rewritten.as_mut().unwrap();
            *bytes = b;
            match r {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *off += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.write_timer.is_none() {
                    let at = now_ms() + self.lim.write_timeout.as_millis() as u64;
                    if expired(&mut self.write_timer, at, cx) {
                        return Poll::Ready(Err(timed_out("write timeout")));
                    }
                } else if self
                    .write_timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready())
                {
                    return Poll::Ready(Err(timed_out(
                        "write timeout: the client stopped reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before
                    && this.st.busy.load(Relaxed) == 0
                    && this.st.head_started.load(Relaxed) == 0
                {
                    this.st.head_started.store(now_ms(), Relaxed);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                *this.st.reader.lock().unwrap() = Some(cx.waker().clone());
                match this.st.read_deadline(&this.lim) {
                    Some(at) => {
                        if expired(&mut this.read_timer, at, cx) {
                            return Poll::Ready(Err(timed_out("idle or header timeout")));
                        }
                    }
                    None => this.read_timer = None,
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(n) = this.intercept(buf, buf.len()) {
            return Poll::Ready(Ok(n));
        }
        this.poll_write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let total = bufs.iter().map(|b| b.len()).sum();
        if let Some(n) = this.intercept(first, total) {
            return Poll::Ready(Ok(n));
        }
        this.poll_write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_rewritten(cx))?;
        this.poll_write_with(cx, |s, cx| s.poll_flush(cx))
    }

    /// A lingering close (as nginx's): send FIN, then read and drop what the client still
    /// sends (a body we answered 413 to without reading, the rest of an oversized head) until
    /// it closes too, for at most [`LINGER`] and [`LINGER_BYTES`]. Closing with unread bytes
    /// would make the kernel send a reset, and a reset can destroy the response in flight.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_rewritten(cx))?;
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((now_ms() + LINGER.as_millis() as u64, 0));
        }
        let mut scratch = [0u8; 8192];
        while let Some((until, dropped)) = this.linger.as_mut() {
            if *dropped > LINGER_BYTES {
                break;
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => *dropped += buf.filled().len(),
                Poll::Ready(_) => break,
                Poll::Pending => {
                    let until = *until;
                    if expired(&mut this.read_timer, until, cx) {
                        break;
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The bytes of the refusal sent past the connection cap.
fn refusal(max: usize) -> Vec<u8> {
    let body = ApiError::unavailable(format!(
        "this server has {max} open connections, its limit (--max-connections); retry later"
    ))
    .body()
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Log at most one line per second for a repeated condition (accept errors, refusals).
struct RateLog {
    last: AtomicU64,
    skipped: AtomicU64,
}

impl RateLog {
    const fn new() -> Self {
        RateLog {
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    fn warn(&self, msg: impl FnOnce() -> String) {
        let now = now_ms();
        if now.saturating_sub(self.last.load(Relaxed)) >= 1000 {
            self.last.store(now, Relaxed);
            let skipped = self.skipped.swap(0, Relaxed);
            tracing::warn!(similar_since_last = skipped, "{}", msg());
        } else {
            self.skipped.fetch_add(1, Relaxed);
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting, let every open
/// connection finish its request (idle ones close at once), and return when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    lim: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    static ACCEPT_ERRORS: RateLog = RateLog::new();
    static REFUSED: RateLog = RateLog::new();
    let slots = Arc::new(Semaphore::new(lim.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let refuse = refusal(lim.max_connections);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin
                    ACCEPT_ERRORS.warn(|| format!("accept error: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            REFUSED.warn(|| {
                format!(
                    "refusing a connection: {} are open (--max-connections)",
                    lim.max_connections
                )
            });
            let _ = stream.try_write(&refuse);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let st = Arc::new(ConnState::new());
            let io = TimedIo {
                inner: stream,
                st: st.clone(),
                lim,
                read_timer: None,
                write_timer: None,
                heads: 0,
                rewritten: None,
                linger: None,
            };
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let busy = Busy::begin(&st);
                let mut app = app.clone();
                async move {
                    let resp = app.call(req.map(Body::new)).await?;
                    Ok::<_, std::convert::Infallible>(resp.map(|b| {
                        Body::new(GuardedBody {
                            inner: b,
                            _busy: busy,
                        })
                    }))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
    let _ = stop_tx.send(true);
    // every connection gives its slot back when it closes
    let _ = slots.acquire_many(lim.max_connections as u32).await;
}

/// Raise the soft limit on open files to the hard limit; returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        r.rlim_cur as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> ConnLimits {
        ConnLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let st = Arc::new(ConnState::new());
        let l = lim();
        let t0 = st.idle_since.load(Relaxed);
        // fresh connection: the header timeout from accept
        assert_eq!(st.read_deadline(&l), Some(t0 + 10_000));
        let busy = Busy::begin(&st);
        assert_eq!(st.read_deadline(&l), None, "never cut a busy connection");
        drop(busy);
        let t1 = st.idle_since.load(Relaxed);
        // between requests: the keep-alive timeout
        assert_eq!(st.read_deadline(&l), Some(t1 + 5_000));
        // a next request started arriving: the header timeout from its first byte
        st.head_started.store(t1 + 100, Relaxed);
        assert_eq!(st.read_deadline(&l), Some(t1 + 10_100));
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_loses_its_endless_response() {
        use axum::routing::get;
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let g = gone.clone();
        let app = Router::new().route(
            "/endless",
            get(move || {
                let guard = Dropped(g.clone());
                async move {
                    let chunk = axum::body::Bytes::from(vec![b'x'; 64 << 10]);
                    let s = tokio_stream::StreamExt::map(
                        tokio_stream::iter(std::iter::repeat(chunk)),
                        move |c| {
                            let _ = &guard;
                            Ok::<_, std::convert::Infallible>(c)
                        },
                    );
                    Body::from_stream(s)
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut l = lim();
        l.write_timeout = Duration::from_millis(300);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, l, async {
            let _ = stop_rx.await;
        }));
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.writable().await.unwrap();
        let req = b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(c.try_write(req).unwrap(), req.len());
        // never read: once the socket's buffers are full, the write stalls and times out
        let t = Instant::now();
        while !gone.load(Relaxed) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the stalled response lives on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(c);
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not drain")
            .unwrap();
    }

    #[test]
    fn refusal_is_a_json_503() {
        let r = String::from_utf8(refusal(7)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 "));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("7 open"));
        let len: usize = r
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
}
