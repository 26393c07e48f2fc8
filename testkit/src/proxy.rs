use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::with_host_port;

/// Which directions are currently held back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    HoldResponses,
    Pause,
}

impl Mode {
    fn holds(self, server_to_client: bool) -> bool {
        match self {
            Mode::Forward => false,
            Mode::HoldResponses => server_to_client,
            Mode::Pause => true,
        }
    }
}

struct Shared {
    /// Where new connections go (see [`FaultProxy::retarget`]).
    target: Mutex<SocketAddr>,
    mode: watch::Sender<Mode>,
    /// Number of server->client chunks currently held.
    held_responses: watch::Sender<usize>,
    refuse: AtomicBool,
    /// While true, new connections are accepted but not forwarded until it is false again.
    stall_new: watch::Sender<bool>,
    accepted: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
}

/// A TCP proxy between clients and PostgreSQL that can inject network faults.
///
/// It runs as tasks on the tokio runtime that called [`FaultProxy::start`]. While a direction is
/// held, its forwarder has read at most one chunk and stops reading, so further bytes wait in the
/// kernel's socket buffers as on a stalled network; nothing is lost or reordered.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: AbortHandle,
}

impl FaultProxy {
    /// Listen on 127.0.0.1 (a free port) and forward every accepted connection to `target`.
    ///
    /// # Panics
    ///
    /// When it cannot listen, or outside a tokio runtime.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("pgsession-testkit: FaultProxy cannot listen on 127.0.0.1");
        let addr = listener.local_addr().expect("listener has an address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            mode: watch::Sender::new(Mode::Forward),
            held_responses: watch::Sender::new(0),
            refuse: AtomicBool::new(false),
            stall_new: watch::Sender::new(false),
            accepted: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept_loop = tokio::spawn(accept(listener, shared.clone())).abort_handle();
        FaultProxy {
            addr,
            shared,
            accept_loop,
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` pointing at this proxy: host and port replaced; user, database and parameters kept.
    pub fn proxied_url(&self, url: &str) -> String {
        with_host_port(url, &self.addr.to_string())
    }

    /// Stop forwarding in both directions on all current and future connections, keeping the
    /// sockets open: a silent, half-open network (no FIN, no RST). Held bytes are delivered, in
    /// order, on [`FaultProxy::resume`].
    pub fn pause(&self) {
        self.shared.mode.send_replace(Mode::Pause);
    }

    /// Hold only server->client bytes: queries reach the server, their answers are held.
    pub fn hold_responses(&self) {
        self.shared.mode.send_replace(Mode::HoldResponses);
    }

    /// Forward normally again, delivering held bytes in order.
    pub fn resume(&self) {
        self.shared.mode.send_replace(Mode::Forward);
    }

    /// Resolves once at least one server->client chunk is being held (after
    /// [`FaultProxy::hold_responses`] or [`FaultProxy::pause`]).
    pub async fn wait_until_response_held(&self) {
        let mut held = self.shared.held_responses.subscribe();
        // The sender lives in `shared`, which we keep alive, so this cannot fail.
        let _ = held.wait_for(|&n| n > 0).await;
    }

    /// Close every current connection abruptly, paused or not: both of its sockets are dropped
    /// and held bytes discarded, so the client sees EOF or a reset.
    pub fn disconnect_all(&self) {
        for connection in lock(&self.shared.connections).drain(..) {
            connection.abort();
        }
    }

    /// While `true`, newly accepted connections are closed at once, like a server that is down
    /// (the client's TCP connect succeeds, then it reads EOF).
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// While `true`, newly accepted connections are held without reaching the server (as
    /// behind an overloaded server or a lossy network, a client's connection attempt hangs);
    /// they are forwarded once this is set back to `false`. Existing connections are not
    /// affected.
    pub fn stall_new(&self, stall: bool) {
        self.shared.stall_new.send_replace(stall);
    }

    /// Send new connections to `target` from now on, as a virtual IP or a DNS name moved to
    /// another server would (after a failover, say). Current connections are left as they are:
    /// cut them with [`FaultProxy::disconnect_all`].
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    /// Number of connections accepted so far, refused ones included.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.disconnect_all();
    }
}

fn lock(connections: &Mutex<Vec<AbortHandle>>) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
    // Nothing can be left half-updated in a Vec of handles, so a poisoned lock is still usable.
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            continue;
        }
        let task = tokio::spawn(forward(client, shared.clone()));
        let mut connections = lock(&shared.connections);
        connections.retain(|c| !c.is_finished());
        connections.push(task.abort_handle());
    }
}

async fn forward(client: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let mut stall = shared.stall_new.subscribe();
    if stall.wait_for(|stalled| !*stalled).await.is_err() {
        return Ok(());
    }
    let target = *shared.target.lock().unwrap_or_else(|e| e.into_inner());
    let server = TcpStream::connect(target).await?;
    // Small protocol messages must not sit in Nagle's buffer and look like a held response.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // try_join: when one direction fails the other is dropped too, closing all four halves.
    tokio::try_join!(
        pump(client_read, server_write, &shared, false),
        pump(server_read, client_write, &shared, true),
    )?;
    Ok(())
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    server_to_client: bool,
) -> io::Result<()> {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let held = mode.borrow_and_update().holds(server_to_client);
        if held {
            let _counted = server_to_client.then(|| HeldResponse::new(&shared.held_responses));
            if mode.wait_for(|m| !m.holds(server_to_client)).await.is_err() {
                return Ok(());
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Counts a held response for as long as it lives, including when its task is aborted.
struct HeldResponse<'a>(&'a watch::Sender<usize>);

impl<'a> HeldResponse<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        HeldResponse(count)
    }
}

impl Drop for HeldResponse<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
