//! How long a connection Velox tracks lives without a packet, by state: the same
//! for the NAT of connections from outside and for those NetworkPolicy follows.

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use velox_common::ConnectionTimeouts;

/// Written by the loader (`--ct-timeout-*`) before it pins the programs.
#[btf_map]
static VELOX_CT_TIMEOUTS: Array<ConnectionTimeouts, 1> = Array::new();

/// The timeouts in force; `None` only if the map cannot be read at all.
#[inline(always)]
pub fn connection_timeouts() -> Option<&'static ConnectionTimeouts> {
    VELOX_CT_TIMEOUTS.get(0)
}
