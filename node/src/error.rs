//! Typed errors of the node layer. The CNI plugin turns them into CNI error codes;
//! [`Error::NotReady`] is the one a caller can retry.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The loader has not (yet) created what the caller needs.
    #[error("velox-loader is not ready: {what} ({source}); is velox-loader running?")]
    NotReady {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid record", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Another endpoint holds the address in the endpoint map.
    #[error("{ip} is already the address of the pod behind host veth ifindex {holder}")]
    AddressTaken { ip: std::net::IpAddr, holder: u32 },
    /// The built-in allocator has no free address left in a subnet.
    #[error("no free address left in {subnet} ({in_use} in use)")]
    Exhausted { subnet: ipnet::IpNet, in_use: usize },
    /// Every counters slot is taken.
    #[error("this node already has {max_pods} pods, the most velox-loader's --max-pods allows")]
    NodeFull { max_pods: u32 },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub fn map(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> Self {
        let what = what.into();
        move |source| Self::Map { what, source }
    }

    pub fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let what = what.into();
        move |source| Self::Netlink { what, source }
    }

    pub fn program(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        let what = what.into();
        move |source| Self::Program { what, source }
    }

    pub fn invalid<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |e| Self::Invalid(format!("{what}: {e}"))
    }

    pub fn not_ready<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| Self::NotReady {
            what,
            source: Box::new(source),
        }
    }
}

/// Best-effort teardown: every step runs, every failure is kept, and the caller
/// learns of all of them at the end.
#[derive(Debug, Default)]
pub struct ErrorList {
    errors: Vec<Box<dyn std::error::Error + Send + Sync>>,
}

impl ErrorList {
    /// Keeps the error of `result`, if any, and hands back its value.
    pub fn keep<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        &mut self,
        result: std::result::Result<T, E>,
    ) -> Option<T> {
        result.map_err(|e| self.errors.push(e.into())).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok` when nothing failed.
    pub fn into_result(self) -> std::result::Result<(), Self> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl std::fmt::Display for ErrorList {
    /// Every error with its causes: `a: cause; b: cause`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
            let mut source = error.source();
            while let Some(cause) = source {
                write!(f, ": {cause}")?;
                source = cause.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for ErrorList {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_list_keeps_every_failure_with_its_causes() {
        let mut errors = ErrorList::default();
        assert_eq!(errors.keep(Ok::<_, Error>(3)), Some(3));
        errors.keep(Err::<(), _>(Error::Invalid("first".into())));
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        errors.keep(Err::<(), _>(Error::io("second")(io)));
        assert_eq!(errors.to_string(), "first; second: gone");
        assert!(errors.into_result().is_err());
        assert!(ErrorList::default().into_result().is_ok());
    }
}
