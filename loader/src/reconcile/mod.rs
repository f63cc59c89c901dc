//! The reconcilers: each keeps one kind of kernel object in line with what it is
//! fed (the endpoint records, or the cluster source's objects), and is cheap when
//! nothing changed.

pub mod endpoints;
pub mod flows;
pub mod masquerade;
pub mod peers;
pub mod policy;
pub mod routes;
pub mod services;
pub mod tunnel;
