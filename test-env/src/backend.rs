//! A Service backend for the tests: answers every TCP connection or UDP datagram on
//! an address inside a netns with its name, until dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
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
                            Ok((mut stream, _)) => {
                                stream.set_nonblocking(false)?;
                                stream.write_all(name.as_bytes())?;
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
                                socket.send_to(name.as_bytes(), from)?;
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
