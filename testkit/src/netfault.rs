//! A TCP forwarder in front of an upstream that can be switched, at any
//! moment, to misbehave the way networks do: accept and never answer (a
//! blackhole), or refuse every connection. For breaker and timeout tests.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the forwarder does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass bytes both ways to the target.
    Forward = 0,
    /// Accept, read, never answer.
    Blackhole = 1,
    /// Accept and close at once.
    Refuse = 2,
}

pub struct NetFault {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    stopping: Arc<AtomicBool>,
}

impl NetFault {
    /// Forwards a loopback port to `target`.
    pub fn start(target: SocketAddr) -> NetFault {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Forward as u8));
        let stopping = Arc::new(AtomicBool::new(false));
        let (m, stop) = (mode.clone(), stopping.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                match m.load(Ordering::SeqCst) {
                    0 => forward(conn, target, m.clone()),
                    1 => {
                        let stop = stop.clone();
                        std::thread::spawn(move || swallow(conn, &stop));
                    }
                    _ => drop(conn),
                }
            }
        });
        NetFault {
            addr,
            mode,
            stopping,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// New connections from now on get `mode` (open ones keep theirs).
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for NetFault {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Passes bytes both ways while the mode stays `Forward`; a connection
/// opened before a switch then goes silent (blackhole) or is cut (refuse),
/// as pooled connections do when a network path dies.
fn forward(client: TcpStream, target: SocketAddr, mode: Arc<AtomicU8>) {
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        return;
    };
    let pipe = move |mut from: TcpStream, mut to: TcpStream| {
        let mode = mode.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match mode.load(Ordering::SeqCst) {
                    0 => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // Blackhole: swallow what comes, answer nothing.
                    1 => continue,
                    _ => break,
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
        pipe(client, server);
        pipe(s2, c2);
    }
}

/// Reads whatever comes and answers nothing, until the peer or the test goes.
fn swallow(mut conn: TcpStream, stopping: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    while !stopping.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    let _ = conn.flush();
}
