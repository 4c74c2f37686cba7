//! A TCP proxy on loopback that breaks connections on demand, placed between a client
//! and its broker in fault scenarios.
//!
//! It can cut every open connection, stall traffic (connections stay open, no bytes
//! flow), refuse new connections, and drop each new connection after it carried a
//! number of bytes. It only ever connects to the upstream address it was given, which
//! the tests keep on this machine.
//!
//! It may listen on a fixed port ([`ProxyOptions::listen`]: Kafka advertises the proxy's
//! address to its clients) and may replace a byte string in the server-to-client
//! direction by another of the same length ([`ProxyOptions::rewrite`]: a RocketMQ name
//! server's answer then names a proxied broker address instead of the real one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy. Dropping it stops accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// How a [`FaultProxy`] listens and what it rewrites.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// Where to listen; `None`: `127.0.0.1` on a random port.
    pub listen: Option<SocketAddr>,
    /// `(from, to)`: every `from` the server sends reaches the client as `to`, even when
    /// split across reads. Both must have the same length, so that length-prefixed frames
    /// stay valid.
    pub rewrite: Option<(Vec<u8>, Vec<u8>)>,
}

struct Shared {
    upstream: SocketAddr,
    rewrite: Option<(Vec<u8>, Vec<u8>)>,
    /// Bumped to close every open connection.
    cut: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    refuse: AtomicBool,
    /// Bytes a new connection may carry before it is dropped; 0 = unlimited.
    drop_after: AtomicU64,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:<random port>` forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        FaultProxy::start_with(upstream, ProxyOptions::default()).await
    }

    /// Starts a proxy forwarding to `upstream` as `options` say.
    pub async fn start_with(
        upstream: SocketAddr,
        options: ProxyOptions,
    ) -> std::io::Result<FaultProxy> {
        if let Some((from, to)) = &options.rewrite
            && (from.len() != to.len() || from.is_empty())
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a rewrite must replace a non-empty byte string by one of the same length",
            ));
        }
        let listener = match options.listen {
            Some(addr) => TcpListener::bind(addr).await?,
            None => TcpListener::bind(("127.0.0.1", 0)).await?,
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            rewrite: options.rewrite,
            cut: watch::Sender::new(0),
            stalled: watch::Sender::new(false),
            refuse: AtomicBool::new(false),
            drop_after: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection now (new ones are still accepted).
    pub fn cut_all(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Stops (`true`) or resumes (`false`) forwarding bytes on every connection.
    pub fn stall(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Closes new connections at once while `true`, like a broker that is down.
    pub fn refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Drops each connection accepted from now on after it carried `bytes` bytes in
    /// either direction; `None` lifts the limit.
    pub fn drop_after(&self, bytes: Option<u64>) {
        self.shared
            .drop_after
            .store(bytes.unwrap_or(0), Ordering::SeqCst);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        tokio::spawn(serve(client, shared.clone()));
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::SeqCst);
    let budget = match shared.drop_after.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Arc::new(AtomicU64::new(n))),
    };
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let mut cut = shared.cut.subscribe();
    cut.borrow_and_update();
    // Either direction ending, a cut or a spent budget closes both halves: dropping the
    // tasks' streams sends FIN/RST to both peers.
    tokio::select! {
        _ = pump(cr, uw, shared.stalled.subscribe(), budget.clone(), None) => {}
        _ = pump(ur, cw, shared.stalled.subscribe(), budget, shared.rewrite.clone()) => {}
        _ = cut.changed() => {}
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

/// How long a possible start of the rewritten string waits for the bytes that would
/// complete it before it is forwarded as it is.
const REWRITE_HOLD: std::time::Duration = std::time::Duration::from_millis(20);

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    budget: Option<Arc<AtomicU64>>,
    rewrite: Option<(Vec<u8>, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes read but not forwarded yet: a tail that may be the start of `rewrite.0`.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let read = if held.is_empty() {
            from.read(&mut buf).await
        } else {
            match tokio::time::timeout(REWRITE_HOLD, from.read(&mut buf)).await {
                Ok(read) => read,
                // Nothing more came: the tail was not the string after all.
                Err(_) => Ok(usize::MAX),
            }
        };
        let mut data = std::mem::take(&mut held);
        match read {
            Ok(0) | Err(_) => {
                let _ = to.write_all(&data).await;
                return;
            }
            Ok(usize::MAX) => {}
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if let Some((from_bytes, to_bytes)) = &rewrite {
                    replace_all(&mut data, from_bytes, to_bytes);
                    let keep = partial_suffix(&data, from_bytes);
                    held = data.split_off(data.len() - keep);
                }
            }
        }
        if data.is_empty() {
            continue;
        }
        let n = data.len();
        // While stalled, hold the bytes: the connection stays open but silent.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let allowed = match &budget {
            None => n,
            Some(b) => {
                let left = b.load(Ordering::SeqCst);
                let take = (n as u64).min(left);
                b.fetch_sub(take, Ordering::SeqCst);
                take as usize
            }
        };
        if to.write_all(&data[..allowed]).await.is_err() || allowed < n {
            return;
        }
    }
}

/// Replaces every `from` in `data` by `to` (same length).
fn replace_all(data: &mut [u8], from: &[u8], to: &[u8]) {
    let mut i = 0;
    while i + from.len() <= data.len() {
        if &data[i..i + from.len()] == from {
            data[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
}

/// The length of the longest tail of `data` that is a proper prefix of `pattern`.
fn partial_suffix(data: &[u8], pattern: &[u8]) -> usize {
    let longest = pattern.len().saturating_sub(1).min(data.len());
    (1..=longest)
        .rev()
        .find(|k| data[data.len() - k..] == pattern[..*k])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(data).await?;
        let mut out = vec![0u8; data.len()];
        tokio::time::timeout(Duration::from_millis(500), stream.read_exact(&mut out))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        Ok(out)
    }

    #[tokio::test]
    async fn forwards_then_cuts() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        proxy.cut_all();
        assert!(
            round_trip(&mut s, b"again").await.is_err(),
            "a cut connection still echoed"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, b"new").await.unwrap(), b"new");
    }

    #[tokio::test]
    async fn stall_holds_bytes_until_resumed() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"a").await.unwrap(), b"a");
        proxy.stall(true);
        s.write_all(b"held").await.unwrap();
        let mut out = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut out)).await;
        assert!(early.is_err(), "bytes flowed while stalled");
        proxy.stall(false);
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut out))
            .await
            .expect("bytes flow after the stall")
            .unwrap();
        assert_eq!(&out, b"held");
    }

    #[test]
    fn rewrite_helpers() {
        let mut d = b"a127.0.0.1:10911b127.0.0.1:10911".to_vec();
        replace_all(&mut d, b"127.0.0.1:10911", b"127.0.0.1:19911");
        assert_eq!(d, b"a127.0.0.1:19911b127.0.0.1:19911");
        assert_eq!(partial_suffix(b"xx127.0.0", b"127.0.0.1:10911"), 7);
        // A whole pattern at the end is rewritten already; only its last "1" could still
        // start the next one.
        assert_eq!(partial_suffix(b"xx127.0.0.1:10911", b"127.0.0.1:10911"), 1);
        assert_eq!(partial_suffix(b"xx127.0.0.1:10999", b"127.0.0.1:10911"), 0);
        assert_eq!(partial_suffix(b"", b"127"), 0);
    }

    #[tokio::test]
    async fn rewrites_across_reads() {
        let proxy = FaultProxy::start_with(
            echo_server().await,
            ProxyOptions {
                listen: None,
                rewrite: Some((b"HELLO".to_vec(), b"WORLD".to_vec())),
            },
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // The string split over two writes (and reads) is still replaced.
        s.write_all(b"xHEL").await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.write_all(b"LOy").await.unwrap();
        let mut out = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&out, b"xWORLDy");
        // A tail that only looks like a start is forwarded after the short hold.
        assert_eq!(round_trip(&mut s, b"abcHE").await.unwrap(), b"abcHE");
    }

    #[tokio::test]
    async fn drop_after_and_refuse() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.drop_after(Some(6));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"abc").await.unwrap(), b"abc");
        assert!(
            round_trip(&mut s, b"defgh").await.is_err(),
            "the connection outlived its byte budget"
        );
        proxy.drop_after(None);
        proxy.refuse(true);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            round_trip(&mut refused, b"x").await.is_err(),
            "a refused connection echoed"
        );
        proxy.refuse(false);
        let mut ok = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut ok, b"ok").await.unwrap(), b"ok");
    }
}
