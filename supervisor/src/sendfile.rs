//! Blob bytes sent to plain-TCP HTTP/1 clients by `sendfile(2)`: from the
//! page cache to the socket inside the kernel, never read into a buffer of
//! ours nor copied out of one.
//!
//! hyper owns the connection and writes whatever a response body yields, so
//! a body on such a connection yields *placeholders*: slices of one
//! allocation that is never written nor read (so never resident), each
//! standing for a span of a file that it queued in the connection's
//! [`Spans`]. The connection's stream, a [`Wire`], knows the placeholder
//! among the slices hyper writes and sends the file span instead. hyper
//! writes an HTTP/1 body in order and one response at a time, so the spans
//! are met in the order they were queued. TLS and HTTP/2 connections have no
//! `Spans` and are sent read bytes as before.
//!
//! The socket is not corked (`TCP_CORK`, nginx's `tcp_nopush`): corked, a
//! warm 256 MiB GET on loopback ran at 1.7 GB/s against 3.1 GB/s uncorked
//! (45 interleaved GETs each, beside a static nginx at 1.7 GB/s). Its lower
//! CPU count per GB (0.14 against 0.31 s) did not buy speed.
//!
//! On loopback `sendfile` moves the one remaining copy's read of cold page
//! cache onto the client: a Python reader of a warm 256 MiB blob used 0.17 s
//! of CPU against 0.12 s when the front read and wrote the bytes itself (and
//! 0.14 s from `docker-registry`, 0.18 s from nginx's `sendfile`; 12 GETs
//! each, interleaved). So a blob body goes by `sendfile` unless its client
//! runs on this host and it is the only body going out
//! ([`Sending::copies`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The largest placeholder, and the most one `sendfile` call sends: each
/// call runs on the connection's runtime thread, so it is bounded (nginx's
/// `sendfile_max_chunk` default).
pub const CHUNK: usize = 2 << 20;

/// Zeroed memory from the allocator (`calloc`: fresh pages, mapped lazily),
/// never touched, so it costs address space only.
static PLACEHOLDER: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(vec![0u8; CHUNK]));

/// The blob bodies being sent on the plain-TCP connections of a process
/// (one for the front), whichever way their bytes go.
#[derive(Default)]
pub struct Bodies(AtomicUsize);

impl Bodies {
    pub const fn new() -> Bodies {
        Bodies(AtomicUsize::new(0))
    }
}

/// The file spans of one connection's placeholders, in the order hyper
/// writes them; a cheap handle shared by the connection's [`Wire`] and the
/// bodies of its responses.
#[derive(Clone)]
pub struct Spans {
    queue: Arc<Mutex<VecDeque<Span>>>,
    /// Bytes sent from files so far (what a test can check).
    sent: Arc<AtomicU64>,
    /// The client runs on this host: its CPUs are ours.
    local: bool,
    bodies: &'static Bodies,
}

struct Span {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

impl Spans {
    /// A connection's handle: its client on this host or not, its bodies
    /// counted in `bodies`.
    pub fn new(local: bool, bodies: &'static Bodies) -> Spans {
        Spans {
            queue: Arc::default(),
            sent: Arc::default(),
            local,
            bodies,
        }
    }

    /// One blob body on this connection, counted while it is sent.
    pub fn sending(&self) -> Sending {
        self.bodies.0.fetch_add(1, Ordering::Relaxed);
        Sending {
            spans: self.clone(),
        }
    }

    /// A placeholder for `len` bytes (at most [`CHUNK`]) of `file` at
    /// `offset`, to be yielded as the next body chunk on this connection.
    pub fn chunk(&self, file: &Arc<File>, offset: u64, len: usize) -> Bytes {
        self.queue.lock().unwrap().push_back(Span {
            file: file.clone(),
            offset,
            len,
        });
        PLACEHOLDER.slice(..len)
    }

    /// The handle for the next request on the connection. hyper reads a
    /// request only once the answer before it is written, so any span left
    /// queued belongs to an answer cut short: dropped, it cannot stand for
    /// this answer's placeholders.
    pub fn for_request(&self) -> Spans {
        self.queue.lock().unwrap().clear();
        self.clone()
    }

    /// The body chunks of bytes `start..end` of `file`, a committed blob,
    /// counted as a body going out while they are sent ([`Sending::next`]).
    pub fn file(
        self,
        file: File,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let file = Arc::new(file);
        let sending = self.sending();
        futures_util::stream::unfold(start, move |at| {
            let next = (at < end).then(|| {
                match sending.next(&file, at, end, regcache_store::ReadBuf::sized) {
                    Ok(chunk) => {
                        let to = at + chunk.len() as u64;
                        (Ok(chunk), to)
                    }
                    Err(e) => (Err(e), end),
                }
            });
            std::future::ready(next)
        })
    }

    /// Bytes sent from files on this connection.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// One blob body on a connection with [`Spans`], counted in its process's
/// [`Bodies`] until dropped.
pub struct Sending {
    spans: Spans,
}

impl Sending {
    /// Whether the next chunk of a blob is better read here and written
    /// than sent by `sendfile`: when the client runs on this host (a
    /// loopback connection, or one to our own address) and no other blob
    /// is going out. By `sendfile`, the client's own read of the bytes is a
    /// read of memory long out of the CPU's caches (a stored blob, or a
    /// fill running ahead of a client that hashes and writes what it
    /// gets); copied, that read is the front's, on the core the client
    /// leaves idle, and the client reads what was just written. A cold 256
    /// MiB skopeo pull took 1.21x direct copied against 1.36x by
    /// `sendfile` (12 interleaved pulls each, two cores); warm ones
    /// 0.95-1.09x against 1.00-1.11x, skopeo's CPU 0.09-0.13 s less (three
    /// runs of 10-12 interleaved rounds), while curl's warm GET ran at
    /// 153-179 % of nginx's `sendfile` against 133-148 % (two runs of 15
    /// GETs each).
    /// With other blobs going out the copies add up, where `sendfile` costs
    /// the front nothing: 16 clients of one cold blob, all copied, took
    /// 2.51 s against 1.87 s (nginx 1.94 s). Asked afresh for each chunk.
    pub fn copies(&self) -> bool {
        self.spans.local && self.spans.bodies.0.load(Ordering::Relaxed) == 1
    }

    /// The body's next chunk, of bytes `at..end` of `file`: read into the
    /// room `room(end - at)` gives while the body [copies](Self::copies),
    /// else a placeholder for at most [`CHUNK`] of them.
    pub fn next(
        &self,
        file: &Arc<File>,
        at: u64,
        end: u64,
        room: fn(u64) -> regcache_store::ReadBuf,
    ) -> io::Result<Bytes> {
        if self.copies() {
            return read(file, at, room(end - at));
        }
        let len = (end - at).min(CHUNK as u64) as usize;
        Ok(self.spans.chunk(file, at, len))
    }
}

/// As many of `file`'s bytes from `at` as `room` holds, in a buffer of
/// their own. A positioned read on this thread: from the page cache it
/// costs less than a hop to the blocking pool, and a file not in the page
/// cache holds this thread as `sendfile` would.
pub fn read(file: &File, at: u64, room: regcache_store::ReadBuf) -> io::Result<Bytes> {
    let mut buf = vec![0; room.size()];
    file.read_exact_at(&mut buf, at)?;
    Ok(room.into_bytes(buf))
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.spans.bodies.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `s` stands for a file span (is not bytes of its own).
#[cfg(test)]
pub fn is_placeholder(s: &[u8]) -> bool {
    placeholder_offset(s).is_some()
}

/// How far into the placeholder `s` starts, if it is one.
fn placeholder_offset(s: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = (s.as_ptr() as usize).checked_sub(base)?;
    (!s.is_empty() && at + s.len() <= CHUNK).then_some(at)
}

/// A plain-TCP client connection whose placeholders become `sendfile`s.
pub struct Wire {
    tcp: TcpStream,
    spans: Spans,
}

impl Wire {
    pub fn new(tcp: TcpStream, bodies: &'static Bodies) -> Wire {
        let local = match (tcp.peer_addr(), tcp.local_addr()) {
            (Ok(peer), Ok(us)) => {
                let peer = peer.ip().to_canonical();
                peer.is_loopback() || peer == us.ip().to_canonical()
            }
            _ => false,
        };
        Wire {
            tcp,
            spans: Spans::new(local, bodies),
        }
    }

    /// The handle for this connection's responses.
    pub fn spans(&self) -> Spans {
        self.spans.clone()
    }

    /// Sends (part of) the placeholder `slot`, which is `at` bytes into the
    /// oldest queued span.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        slot: &[u8],
        at: usize,
    ) -> Poll<io::Result<usize>> {
        let mut queue = self.spans.queue.lock().unwrap();
        let Some(span) = queue.front() else {
            // Never sends the placeholder's zeros for want of a span.
            return Poll::Ready(Err(io::Error::other("a file placeholder without its span")));
        };
        let count = slot.len().min(span.len.saturating_sub(at));
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut offset = (span.offset + at as u64) as nix::libc::off_t;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile(
                    self.tcp.as_fd(),
                    span.file.as_fd(),
                    Some(&mut offset),
                    count,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than its answer",
                    )))
                }
                Ok(n) => {
                    if at + n >= span.len {
                        queue.pop_front();
                    }
                    self.spans.sent.fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match placeholder_offset(buf) {
            Some(at) => self.poll_sendfile(cx, buf, at),
            None => Pin::new(&mut self.tcp).poll_write(cx, buf),
        }
    }

    /// Plain slices up to the first placeholder go out in one `writev`; a
    /// placeholder first goes out by `sendfile`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().position(|b| placeholder_offset(b).is_some()) {
            Some(0) => {
                let at = placeholder_offset(&bufs[0]).unwrap_or(0);
                self.poll_sendfile(cx, &bufs[0], at)
            }
            Some(i) => Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..i]),
            None => Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;
    use std::path::PathBuf;

    /// Serves `GET /START/END`, bytes `START..END` of the file at `path`,
    /// as [`Spans::file`] over a [`Wire`], on one connection; gives its
    /// spans. With `other_body`, another blob body is going out meanwhile,
    /// so the loopback client is not copied to ([`Sending::copies`]).
    async fn server(
        path: PathBuf,
        other_body: bool,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<Spans>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let wire = Wire::new(tcp, Box::leak(Box::default()));
            assert!(wire.spans.local, "a loopback client runs on this host");
            let spans = wire.spans();
            let _other = other_body.then(|| spans.sending());
            let _ = tx.send(spans.clone());
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (spans, path) = (spans.clone(), path.clone());
                    async move {
                        let mut at = req
                            .uri()
                            .path()
                            .split('/')
                            .skip(1)
                            .map(|n| n.parse::<u64>().unwrap());
                        let (start, end) = (at.next().unwrap(), at.next().unwrap());
                        let chunks = spans.file(File::open(path).unwrap(), start, end);
                        let body = StreamBody::new(chunks.map_ok(Frame::data));
                        let mut resp = http::Response::new(body);
                        resp.headers_mut()
                            .insert(http::header::CONTENT_LENGTH, (end - start).into());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(true)
                .serve_connection(TokioIo::new(wire), svc)
                .await;
        });
        (addr, rx)
    }

    type Client = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    async fn connect(addr: std::net::SocketAddr) -> Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(client: &mut Client, path: String) -> Bytes {
        let req = http::Request::get(path)
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        (f, data)
    }

    #[tokio::test]
    async fn answers_on_one_connection_get_exact_file_bytes_sent_by_the_kernel() {
        let (file, data) = file_of(5 * CHUNK / 2 + 7);
        let (addr, spans) = server(file.path().to_owned(), true).await;
        let mut client = connect(addr).await;
        let n = data.len();
        let ranges = [
            (0, n),
            (100, 3_000_000),
            (n - 10, n),
            (CHUNK, 2 * CHUNK),
            (0, n),
        ];
        for (start, end) in ranges {
            let body = get(&mut client, format!("/{start}/{end}")).await;
            assert!(body[..] == data[start..end], "bytes {start}..{end}");
        }
        let sent: usize = ranges.iter().map(|(s, e)| e - s).sum();
        let sent = sent as u64;
        assert_eq!(spans.await.unwrap().sent(), sent, "every byte by sendfile");
    }

    /// A client that reads late fills the socket: the sends wait for room
    /// and resume where they stopped.
    #[tokio::test]
    async fn a_slow_client_gets_every_byte() {
        let (file, data) = file_of(12 << 20);
        let (addr, _spans) = server(file.path().to_owned(), true).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let n = data.len();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(
            format!("GET /0/{n} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let mut buf = vec![0; 4096];
        loop {
            let k = tcp.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
            if got.len() < 1 << 20 {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(
            got[head_end..] == data[..],
            "{} body bytes of {n}",
            got.len() - head_end
        );
    }

    #[tokio::test]
    async fn a_lone_client_on_this_host_is_sent_read_bytes() {
        let (file, data) = file_of(3 * CHUNK + 5);
        let (addr, spans) = server(file.path().to_owned(), false).await;
        let n = data.len();
        let body = get(&mut connect(addr).await, format!("/3/{n}")).await;
        assert!(body[..] == data[3..], "{} bytes of {}", body.len(), n - 3);
        assert_eq!(spans.await.unwrap().sent(), 0, "no byte by sendfile");
    }

    #[tokio::test]
    async fn a_stored_blob_is_copied_only_while_no_other_body_goes_out() {
        let (file, data) = file_of(2 * CHUNK);
        let next = |chunks: &mut (dyn Stream<Item = io::Result<Bytes>> + Unpin)| {
            futures_util::FutureExt::now_or_never(chunks.try_next())
                .unwrap()
                .unwrap()
                .unwrap()
        };
        let spans = Spans::new(true, Box::leak(Box::default()));
        let mut chunks = Box::pin(spans.clone().file(
            File::open(file.path()).unwrap(),
            7,
            2 * CHUNK as u64,
        ));
        let first = next(&mut chunks);
        assert!(!is_placeholder(&first) && first[..] == data[7..7 + first.len()]);
        let other = spans.sending();
        let second = next(&mut chunks);
        assert!(
            is_placeholder(&second),
            "sent by the kernel while another body goes out"
        );
        let queued = spans
            .queue
            .lock()
            .unwrap()
            .back()
            .map(|s| (s.offset, s.len));
        assert_eq!(queued, Some((7 + first.len() as u64, second.len())));
        drop(other);
        let third = next(&mut chunks);
        let at = 7 + first.len() + second.len();
        assert!(!is_placeholder(&third) && third[..] == data[at..at + third.len()]);

        let remote = Spans::new(false, Box::leak(Box::default()));
        let mut chunks = Box::pin(remote.file(File::open(file.path()).unwrap(), 0, 10));
        assert!(
            is_placeholder(&next(&mut chunks)),
            "a client elsewhere: sendfile"
        );
    }

    #[test]
    fn a_new_request_drops_spans_left_by_an_answer_cut_short() {
        let (file, _) = file_of(10);
        let file = Arc::new(File::open(file.path()).unwrap());
        let spans = Spans::new(false, Box::leak(Box::default()));
        let _unsent = spans.chunk(&file, 0, 10);
        assert_eq!(spans.queue.lock().unwrap().len(), 1);
        assert!(spans.for_request().queue.lock().unwrap().is_empty());
    }

    #[test]
    fn only_the_placeholder_is_taken_for_one() {
        let p = PLACEHOLDER.slice(10..20);
        assert_eq!(placeholder_offset(&p), Some(10));
        assert_eq!(placeholder_offset(&[0u8; 16]), None);
        assert_eq!(placeholder_offset(&PLACEHOLDER[..0]), None);
    }
}
