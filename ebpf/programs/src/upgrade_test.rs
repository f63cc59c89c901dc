//! The upgrade test's datapath (feature `upgrade-test`): it differs from the real one
//! in one visible way, so a test sees which program a pod's link runs. It drops UDP
//! to the discard port (9), counted as `redirect_failed`: the drop-reason table keeps
//! no reason for a test build.

use velox_common::{DROP_REDIRECT_FAILED, IPPROTO_UDP};

use crate::{parse::Packet, verdict::Outcome};

const DISCARD_PORT: u16 = 9;

#[inline(always)]
pub fn outcome(packet: &Packet, outcome: Outcome) -> Outcome {
    if packet.dst.proto == IPPROTO_UDP && packet.dst.port == DISCARD_PORT.to_be() {
        DROP_REDIRECT_FAILED
    } else {
        outcome
    }
}
