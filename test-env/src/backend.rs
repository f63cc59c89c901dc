//! A Service backend for the tests: answers every TCP connection or UDP datagram on
//! an address inside a netns with its name (and, if asked, the address it came
//! from), until dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::kube_proxy::Protocol;
use crate::netns::spawn_in;

const POLL: Duration = Duration::from_millis(20);

pub struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Backend {
    /// Listens on `addr` in `netns` and returns once it does.
    pub fn start(netns: &str, addr: SocketAddr, protocol: Protocol, name: &str) -> anyhow::Result<Self> {
        Self::start_answering(netns, addr, protocol, name, false)
    }

    /// As [`Backend::start`], answering `<name> <client address>`: what a Service's
    /// client looks like to its backend.
    pub fn start_telling_client(netns: &str, addr: SocketAddr, protocol: Protocol, name: &str) -> anyhow::Result<Self> {
        Self::start_answering(netns, addr, protocol, name, true)
    }

    fn start_answering(
        netns: &str,
        addr: SocketAddr,
        protocol: Protocol,
        name: &str,
        tell_client: bool,
    ) -> anyhow::Result<Self> {
        let answer = move |name: &str, client: SocketAddr| match tell_client {
            true => format!("{name} {}", client.ip()),
            false => name.to_string(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let (name, stopped) = (name.to_string(), stop.clone());
        let thread = spawn_in(netns, move || {
            match protocol {
                Protocol::Tcp => {
                    let listener = TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    ready_tx.send(()).ok();
                    while !stopped.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, client)) => {
                                stream.set_nonblocking(false)?;
                                stream.write_all(answer(&name, client).as_bytes())?;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Protocol::Udp => {
                    let socket = UdpSocket::bind(addr)?;
                    socket.set_read_timeout(Some(POLL))?;
                    ready_tx.send(()).ok();
                    let mut buf = [0u8; 64];
                    while !stopped.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buf) {
                            Ok((_, from)) => {
                                socket.send_to(answer(&name, from).as_bytes(), from)?;
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            Ok(())
        });
        if ready.recv_timeout(Duration::from_secs(3)).is_err() {
            stop.store(true, Ordering::Relaxed);
            let outcome = thread.join().map_err(|_| anyhow::anyhow!("backend thread panicked"))?;
            outcome?;
            anyhow::bail!("backend on {addr} in {netns} did not start");
        }
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request from inside `netns` to `to`: the answer, or why there was none within
/// `timeout`. A connected UDP socket only takes a reply whose source is `to`, as a
/// resolver does.
pub fn request(netns: &str, to: SocketAddr, protocol: Protocol, timeout: Duration) -> anyhow::Result<String> {
    spawn_in(netns, move || {
        let mut answer = String::new();
        match protocol {
            Protocol::Tcp => {
                let mut stream = TcpStream::connect_timeout(&to, timeout)?;
                stream.set_read_timeout(Some(timeout))?;
                stream.read_to_string(&mut answer)?;
            }
            Protocol::Udp => {
                let any: SocketAddr = match to {
                    SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
                    SocketAddr::V6(_) => "[::]:0".parse()?,
                };
                let socket = UdpSocket::bind(any)?;
                socket.connect(to)?;
                socket.set_read_timeout(Some(timeout))?;
                socket.send(b"query")?;
                let mut buf = [0u8; 128];
                let len = socket.recv(&mut buf)?;
                answer = String::from_utf8_lossy(&buf[..len]).into_owned();
            }
        }
        Ok(answer)
    })
    .join()
    .expect("client thread")
}
