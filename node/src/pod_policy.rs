//! ADD's request to the loader on `policy.sock`: "apply the policy of the pod behind
//! this host veth now", answered once its state is in the maps. Typed on both ends:
//! the plugin writes one [`PolicyRequest`] line, the loader one [`PolicyAnswer`]
//! line. The plugin bounds the whole exchange: a loader that is slow, busy or away
//! costs ADD at most that bound, never a failure (the pod stays denied meanwhile).

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The new pod's host-side veth, which names its endpoint record.
    pub host_ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PolicyAnswer {
    /// The pod's own state (its rules, or no isolation) is in the maps.
    Applied,
    /// The loader will not get there soon (why says what it waits for); the pod
    /// stays denied until it does.
    NotApplied { why: String },
}

/// How long ADD waits for the answer, and the loader keeps a request. The loader
/// answers within milliseconds once it knows the pod's Pod object; what takes longer
/// is a watch that lags or an API server that is away, which waiting cannot fix, so
/// the bound stays far below what runtimes allow a sandbox (minutes) and near what a
/// person starting a pod would not notice. After it the pod stays denied until its
/// rules land.
pub const WAIT: Duration = Duration::from_secs(2);

/// Longest request line the loader reads: a host veth name is 15 bytes.
pub const MAX_REQUEST_BYTES: u64 = 256;

/// Asks the loader listening on `socket` for the policy of the pod on `host_ifname`
/// and waits for its answer, for `within` at most.
pub async fn request(socket: &Path, host_ifname: &str, within: Duration) -> Result<PolicyAnswer> {
    let what = || format!("asking {} for the policy of {host_ifname}", socket.display());
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(Error::io(what()))?;
        let request = PolicyRequest {
            host_ifname: host_ifname.to_string(),
        };
        let line = serde_json::to_string(&request).expect("requests serialize") + "\n";
        stream.write_all(line.as_bytes()).await.map_err(Error::io(what()))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(Error::io(what()))?;
        serde_json::from_str(&answer).map_err(|e| Error::Invalid(format!("{}: answered {answer:?}: {e}", what())))
    };
    match tokio::time::timeout(within, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(Error::Invalid(format!("{}: no answer within {within:?}", what()))),
    }
}

/// The loader's end: the request on a fresh connection. A client that sends nothing
/// useful within `within` is refused.
pub async fn read_request(stream: &mut UnixStream, within: Duration) -> Result<PolicyRequest> {
    let read = async {
        let mut line = String::new();
        let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_REQUEST_BYTES));
        limited
            .read_line(&mut line)
            .await
            .map_err(Error::io("reading a policy request"))?;
        serde_json::from_str(&line).map_err(|e| Error::Invalid(format!("a policy request {line:?}: {e}")))
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| Error::Invalid(format!("no policy request within {within:?}")))?
}

/// The loader's answer; a client that has gone (ADD gave up waiting) is no error.
pub async fn answer(mut stream: UnixStream, answer: &PolicyAnswer) {
    let line = serde_json::to_string(answer).expect("answers serialize") + "\n";
    let _ = stream.write_all(line.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn both_ends_speak_the_same_lines() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("policy.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let request = read_request(&mut stream, Duration::from_secs(1)).await.unwrap();
            let why = format!("no Pod object for {} yet", request.host_ifname);
            answer(stream, &PolicyAnswer::NotApplied { why }).await;
        });
        let answered = request(&socket, "vlx0", Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            answered,
            PolicyAnswer::NotApplied {
                why: "no Pod object for vlx0 yet".into()
            }
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_loader_that_does_not_answer_costs_the_bound_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("policy.sock");
        let _listener = UnixListener::bind(&socket).unwrap(); // never accepts
        let started = std::time::Instant::now();
        let err = request(&socket, "vlx0", Duration::from_millis(200)).await.unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let gone = request(&dir.path().join("none"), "vlx0", Duration::from_secs(2)).await;
        assert!(matches!(gone, Err(Error::Io { .. })), "{gone:?}");
    }

    #[tokio::test]
    async fn a_request_that_is_not_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("policy.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let client = tokio::spawn({
            let socket = socket.clone();
            async move {
                let mut stream = UnixStream::connect(&socket).await.unwrap();
                stream.write_all(&[b'x'; 1000]).await.unwrap();
                stream
            }
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let err = read_request(&mut stream, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
        drop(client.await.unwrap());
    }
}
