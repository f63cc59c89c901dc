//! `velox-probe`: one request as a Service client makes it, for the socket load
//! balancer's tests. Runs as its own process, so it can be put in a node's cgroup
//! (the socket hooks act on processes, not threads). Prints one JSON line:
//! `{"answer": ..., "peer": ..., "local": ...}` or `{"error": ...}`.
//!
//! `velox-probe tcp ADDR`: connect, read everything; `peer` is getpeername.
//! `velox-probe udp ADDR`: connected socket, send, receive; `peer` is getpeername.
//! `velox-probe udp-sendto ADDR`: unconnected socket; `peer` is where the reply came from.
//! `velox-probe udp-hold ADDR`: like `udp`, then waits for a line on stdin and sends
//! on the same socket again; prints a second line with that answer or error.
//! `velox-probe crr ADDR SECONDS`: connect, read the first byte, close, again and again
//! (a connection-rate test); prints `{"connections", "per_second", "p50_us", "p99_us"}`.
//! `velox-probe serve ADDR`: the other end of `crr` and `tcp`, until killed: one byte
//! per connection.
//! `velox-probe serve-ports PORT...`: what a pod of the network policy grid serves,
//! until killed: on each port of both families, TCP (one byte per connection, then
//! an echo until the client closes) and UDP (each datagram echoed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

/// The answer, the peer the socket shows, and its own address.
fn request(mode: &str, to: SocketAddr) -> std::io::Result<(String, SocketAddr, SocketAddr)> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let mut buf = [0u8; 256];
    match mode {
        "tcp" => {
            let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok((answer, stream.peer_addr()?, stream.local_addr()?))
        }
        "udp" => {
            let socket = UdpSocket::bind(any)?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send(b"query")?;
            let len = socket.recv(&mut buf)?;
            Ok((
                String::from_utf8_lossy(&buf[..len]).into_owned(),
                socket.peer_addr()?,
                socket.local_addr()?,
            ))
        }
        "udp-sendto" => {
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send_to(b"query", to)?;
            let (len, from) = socket.recv_from(&mut buf)?;
            Ok((
                String::from_utf8_lossy(&buf[..len]).into_owned(),
                from,
                socket.local_addr()?,
            ))
        }
        other => Err(std::io::Error::other(format!("unknown mode {other}"))),
    }
}

/// Connections opened, read and closed one after another for `seconds`.
fn connection_rate(to: SocketAddr, seconds: u64) -> std::io::Result<serde_json::Value> {
    let mut first_byte_us = Vec::new();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while started.elapsed() < Duration::from_secs(seconds) {
        let opened = Instant::now();
        let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.read_exact(&mut byte)?;
        first_byte_us.push(opened.elapsed().as_secs_f64() * 1e6);
        // Close with a reset: no TIME_WAIT on either end, so a source port can come
        // back at once without meeting the last connection's state at the server (a
        // SYN into a TIME_WAIT socket is answered with an ACK and retried after 1 s).
        let abort = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &abort)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    first_byte_us.sort_by(f64::total_cmp);
    let quantile = |q: f64| first_byte_us[((first_byte_us.len() - 1) as f64 * q) as usize];
    Ok(serde_json::json!({
        "connections": first_byte_us.len(),
        "per_second": first_byte_us.len() as f64 / elapsed,
        "p50_us": quantile(0.5),
        "p99_us": quantile(0.99),
    }))
}

/// One exchange on a connected UDP socket, a pause until stdin says, another. Each
/// reports the answer and where it came from, as `recvfrom` shows it (a resolver
/// drops an answer from another address than it asked).
fn hold_udp(to: SocketAddr) {
    let exchange = |socket: &UdpSocket| -> std::io::Result<(String, SocketAddr)> {
        let mut buf = [0u8; 256];
        socket.send(b"query")?;
        let (len, from) = socket.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
    };
    let report = |outcome: std::io::Result<(String, SocketAddr)>| match outcome {
        Ok((answer, from)) => println!("{}", serde_json::json!({"answer": answer, "from": from.to_string()})),
        Err(e) => println!("{}", error_line(&e)),
    };
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let socket = UdpSocket::bind(any).and_then(|s| {
        s.connect(to)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(s)
    });
    let socket = match socket {
        Ok(socket) => socket,
        Err(e) => return report(Err(e)),
    };
    report(exchange(&socket));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    report(exchange(&socket));
}

/// `count` UDP sockets, one after another, each connected to `to`, asked for its
/// peer (as Go's `net.Dial` does) and closed: what a busy client does to the load
/// balancer's per-socket state.
fn churn_udp(to: SocketAddr, count: u64) -> std::io::Result<serde_json::Value> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    for _ in 0..count {
        let socket = UdpSocket::bind(any)?;
        socket.connect(to)?;
        socket.peer_addr()?;
    }
    Ok(serde_json::json!({"sockets": count}))
}

/// UDP datagrams from `from` (an address of this netns) to `to`, as fast as they go,
/// for `seconds`: a flood.
fn flood_udp(from: std::net::IpAddr, to: SocketAddr, seconds: u64) -> std::io::Result<serde_json::Value> {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..1000 {
            // A full queue (ENOBUFS) is part of a flood.
            if socket.send_to(b"flood", to).is_ok() {
                sent += 1;
            }
        }
    }
    Ok(serde_json::json!({"sent": sent}))
}

fn serve(on: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(on)?;
    loop {
        let (mut stream, _) = listener.accept()?;
        stream.write_all(b"x")?;
    }
}

/// One byte, then what the client sends back to it, until it closes.
fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.write_all(b"x")?;
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            len => stream.write_all(&buf[..len])?,
        }
    }
}

/// TCP and UDP on `[::]:port` (IPv4 too, mapped) for every port.
fn serve_ports(ports: &[u16]) -> std::io::Result<()> {
    let mut threads = Vec::new();
    for &port in ports {
        let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        let listener = TcpListener::bind(any)?;
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            loop {
                let (stream, _) = listener.accept()?;
                std::thread::spawn(move || echo(stream));
            }
        }));
        let socket = UdpSocket::bind(any)?;
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = [0u8; 512];
            loop {
                let (len, from) = socket.recv_from(&mut buf)?;
                let _ = socket.send_to(&buf[..len], from);
            }
        }));
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a server thread panicked"))??;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve-ports") {
        let ports: Vec<u16> = args[2..].iter().filter_map(|p| p.parse().ok()).collect();
        if let Err(e) = serve_ports(&ports) {
            eprintln!("velox-probe serve-ports: {e}");
            std::process::exit(1);
        }
        return;
    }
    let (Some(mode), Some(to)) = (args.get(1), args.get(2).and_then(|a| a.parse().ok())) else {
        eprintln!("usage: velox-probe tcp|udp|udp-sendto|udp-hold|serve ADDR:PORT, velox-probe crr ADDR:PORT SECONDS, velox-probe udp-churn ADDR:PORT COUNT, velox-probe udp-flood ADDR:PORT FROM SECONDS");
        std::process::exit(2);
    };
    if mode == "serve" {
        if let Err(e) = serve(to) {
            eprintln!("velox-probe serve {to}: {e}");
            std::process::exit(1);
        }
        return;
    }
    if mode == "udp-hold" {
        hold_udp(to);
        return;
    }
    fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Option<T> {
        args.get(i).and_then(|s| s.parse().ok())
    }
    let outcome = match mode.as_str() {
        "udp-flood" => arg(&args, 3)
            .ok_or_else(|| std::io::Error::other("udp-flood ADDR:PORT FROM SECONDS"))
            .and_then(|from| flood_udp(from, to, arg(&args, 4).unwrap_or(1))),
        "udp-churn" => churn_udp(to, arg(&args, 3).unwrap_or(1)),
        "crr" => connection_rate(to, arg(&args, 3).unwrap_or(5)),
        _ => request(mode, to).map(|(answer, peer, local)| {
            serde_json::json!({"answer": answer, "peer": peer.to_string(), "local": local.to_string()})
        }),
    };
    println!("{}", outcome.unwrap_or_else(|e| error_line(&e)));
}

/// How every mode reports a failure: the error's kind and its message.
fn error_line(e: &std::io::Error) -> serde_json::Value {
    serde_json::json!({"error": format!("{:?}", e.kind()), "message": e.to_string()})
}
