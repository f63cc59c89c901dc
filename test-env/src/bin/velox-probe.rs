//! `velox-probe`: one request as a Service client makes it, for the socket load
//! balancer's tests. Runs as its own process, so it can be put in a node's cgroup
//! (the socket hooks act on processes, not threads). Prints one JSON line:
//! `{"answer": ..., "peer": ...}` or `{"error": ...}`.
//!
//! `velox-probe tcp ADDR`: connect, read everything; `peer` is getpeername.
//! `velox-probe udp ADDR`: connected socket, send, receive; `peer` is getpeername.
//! `velox-probe udp-sendto ADDR`: unconnected socket; `peer` is where the reply came from.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn request(mode: &str, to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let mut buf = [0u8; 256];
    match mode {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok((answer, stream.peer_addr()?))
        }
        "udp" => {
            let socket = UdpSocket::bind(any)?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send(b"query")?;
            let len = socket.recv(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), socket.peer_addr()?))
        }
        "udp-sendto" => {
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send_to(b"query", to)?;
            let (len, from) = socket.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
        }
        other => Err(std::io::Error::other(format!("unknown mode {other}"))),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(to)) = (args.get(1), args.get(2).and_then(|a| a.parse().ok())) else {
        eprintln!("usage: velox-probe tcp|udp|udp-sendto ADDR:PORT");
        std::process::exit(2);
    };
    let line = match request(mode, to) {
        Ok((answer, peer)) => serde_json::json!({"answer": answer, "peer": peer.to_string()}),
        Err(e) => serde_json::json!({"error": format!("{:?}", e.kind()), "message": e.to_string()}),
    };
    println!("{line}");
}
